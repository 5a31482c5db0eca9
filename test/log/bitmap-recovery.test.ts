import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import { IndicatorMap } from '../../src/core/indicator-map.js';
import type { LogRecord } from '../../src/core/records.js';
import { recordBytes } from '../../src/core/records.js';
import { NodeBlockFile } from '../../src/io/block-file.js';
import { BITMAP_FORMAT_VERSION, BitmapFile } from '../../src/log/bitmap-file.js';
import { LogFile } from '../../src/log/log-file.js';
import { recover } from '../../src/log/recovery.js';
import { Prng } from '../sim/prng.js';
import { SimDisk } from '../sim/sim-disk.js';

function bits(regionCount: number, set: number[]): Uint8Array {
  const m = new IndicatorMap(regionCount);
  for (const r of set) m.set(r);
  return m.snapshot();
}

function setOf(regionCount: number, bytes: Uint8Array): number[] {
  return [...IndicatorMap.fromBytes(regionCount, bytes).iterate()];
}

describe('BitmapFile', () => {
  it('formats clean, persists to alternating slots, reads the newest', async () => {
    const disk = new SimDisk(BitmapFile.fileBytes(100));
    await BitmapFile.format(disk, 100);
    let { file, bitmap } = await BitmapFile.open(disk, 100);
    assert.deepEqual(setOf(100, bitmap.bits), []);
    assert.equal(bitmap.coveredLsn, 0);
    await file.persist(bits(100, [1, 99]), 4096, 77);
    await file.persist(bits(100, [5]), 8192, 78);
    ({ file, bitmap } = await BitmapFile.open(disk, 100));
    assert.deepEqual(setOf(100, bitmap.bits), [5]);
    assert.equal(bitmap.coveredLsn, 8192);
    assert.equal(bitmap.idLimit, 78);
  });

  it('a crash in the middle of a write leaves the previous bitmap whole', async () => {
    for (let s = 0; s < 30; s++) {
      const disk = new SimDisk(BitmapFile.fileBytes(1000));
      await BitmapFile.format(disk, 1000);
      const { file } = await BitmapFile.open(disk, 1000);
      await file.persist(bits(1000, [3, 500]), 100, 10);
      await file.writeSlot(bits(1000, [7]), 200, 11);
      disk.crash(new Prng(s), ['partial', 'corrupt', 'absent', 'whole']);
      const { bitmap } = await BitmapFile.open(disk, 1000);
      const got = setOf(1000, bitmap.bits);
      if (bitmap.coveredLsn === 200) assert.deepEqual(got, [7], `seed ${s}`);
      else assert.deepEqual([got, bitmap.coveredLsn], [[3, 500], 100], `seed ${s}`);
    }
  });

  it('a header left by a torn write never comes back with a later write of the same bits', async () => {
    const disk = new SimDisk(BitmapFile.fileBytes(64));
    await BitmapFile.format(disk, 64);
    let { file } = await BitmapFile.open(disk, 64);
    await file.persist(bits(64, [1]), 100, 5); // seq 1, slot 1
    // seq 2 to slot 0: its header lands, its bits do not.
    await file.writeSlot(bits(64, [2]), 300, 6);
    disk.crashPlanned(['absent', 'whole'], new Prng(0)); // bits lost, header landed
    ({ file } = await BitmapFile.open(disk, 64));
    const { bitmap } = await BitmapFile.open(disk, 64);
    assert.equal(bitmap.coveredLsn, 100, 'the torn write is not a bitmap');
    // The next write carries the same bits but loses its header in another crash.
    await file.writeSlot(bits(64, [2]), 200, 6);
    disk.crashPlanned(['whole', 'absent'], new Prng(0)); // bits landed, header lost
    const after = await BitmapFile.open(disk, 64);
    assert.equal(after.bitmap.coveredLsn, 100, 'the stale header (covered 300) must not come back');
  });

  it('refuses a wrong size, no valid slot, or a newer format', async () => {
    await assert.rejects(BitmapFile.open(new SimDisk(100), 100), { code: 'VOLREP_ERR_BITMAP_SIZE' });
    await assert.rejects(BitmapFile.open(new SimDisk(BitmapFile.fileBytes(100)), 100), {
      code: 'VOLREP_ERR_BITMAP_CORRUPT',
    });
    const disk = new SimDisk(BitmapFile.fileBytes(100));
    await BitmapFile.format(disk, 100);
    // Rewrite slot 0's header as a newer version with a valid checksum.
    const header = await disk.read(0, 64);
    const view = new DataView(header.buffer);
    view.setUint32(8, BITMAP_FORMAT_VERSION + 1, true);
    const { crc32c } = await import('@node-rs/crc32');
    view.setUint32(60, crc32c(header.subarray(0, 60)), true);
    disk.poke(0, header);
    await assert.rejects(BitmapFile.open(disk, 100), { code: 'VOLREP_ERR_BITMAP_VERSION' });
  });
});

type NoLsn<T> = T extends unknown ? Omit<T, 'lsn'> : never;

/** A log and bitmap on simulated disks with helpers to append records. */
async function setup(regionCount: number, capacity = 4096) {
  const logDisk = new SimDisk(LogFile.fileBytes(capacity));
  const bmDisk = new SimDisk(BitmapFile.fileBytes(regionCount));
  await LogFile.format(logDisk);
  await BitmapFile.format(bmDisk, regionCount);
  const { log } = await LogFile.open(logDisk);
  let lsn = 0;
  const add = (r: NoLsn<LogRecord>): number => {
    const at = lsn;
    const rec = { ...r, lsn: at } as LogRecord;
    log.append(rec);
    lsn += recordBytes(rec);
    return at;
  };
  return { logDisk, bmDisk, log, add, lsn: () => lsn };
}

describe('recover', () => {
  it('marks every location of a transaction without a completion after the bitmap', async () => {
    const s = await setup(64);
    const t1 = s.add({ type: 'begin', idLimit: 5, ranges: [[1, 2]] });
    s.add({ type: 'begin', idLimit: 5, ranges: [[10, 1]] });
    s.add({ type: 'complete', idLimit: 5, begins: [t1] });
    s.add({
      type: 'begin',
      idLimit: 9,
      ranges: [
        [20, 3],
        [40, 1],
      ],
    });
    await s.log.flush();
    const { bitmap } = await BitmapFile.open(s.bmDisk, 64);
    assert.equal(bitmap.coveredLsn, 0);
    const { file } = await BitmapFile.open(s.bmDisk, 64);
    await file.persist(bits(64, [63]), 0, 3);
    const r = await recover(s.logDisk, s.bmDisk, 64);
    assert.deepEqual(setOf(64, r.state.dirty), [10, 20, 21, 22, 40, 63]);
    assert.equal(r.state.idLimit, 9);
    assert.equal(r.state.logHeadLsn, s.lsn());
    assert.equal(r.report.incompleteTransactions, 2);
  });

  it('ignores records older than the bitmap covered position', async () => {
    const s = await setup(64);
    s.add({ type: 'begin', idLimit: 5, ranges: [[1, 1]] });
    const covered = s.lsn();
    s.add({ type: 'begin', idLimit: 5, ranges: [[2, 1]] });
    await s.log.flush();
    const { file } = await BitmapFile.open(s.bmDisk, 64);
    await file.persist(bits(64, [30]), covered, 100);
    const r = await recover(s.logDisk, s.bmDisk, 64);
    assert.deepEqual(setOf(64, r.state.dirty), [2, 30]);
    assert.equal(r.state.idLimit, 100);
  });

  it('restarts the log at the covered position when the crash lost records the bitmap covers', async () => {
    const s = await setup(64);
    s.add({ type: 'begin', idLimit: 5, ranges: [[1, 1]] });
    await s.log.flush();
    s.add({ type: 'begin', idLimit: 5, ranges: [[2, 1]] });
    const covered = s.lsn();
    await s.log.writeBatch();
    const { file } = await BitmapFile.open(s.bmDisk, 64);
    await file.persist(bits(64, [1, 2]), covered, 6);
    s.logDisk.crash(new Prng(0), ['absent']);
    const r = await recover(s.logDisk, s.bmDisk, 64);
    assert.ok(r.report.restarted);
    assert.equal(r.state.logHeadLsn, covered);
    assert.equal(r.state.logTailLsn, covered);
    assert.deepEqual(setOf(64, r.state.dirty), [1, 2]);
    // A record appended now is found by the next recovery.
    r.log.append({ type: 'begin', lsn: covered, idLimit: 6, ranges: [[9, 1]] });
    await r.log.flush();
    const again = await recover(s.logDisk, s.bmDisk, 64);
    assert.deepEqual(setOf(64, again.state.dirty), [1, 2, 9]);
  });

  it('refuses a record naming regions beyond the volume', async () => {
    const s = await setup(64);
    s.add({ type: 'begin', idLimit: 5, ranges: [[60, 10]] });
    await s.log.flush();
    await assert.rejects(recover(s.logDisk, s.bmDisk, 64), { code: 'VOLREP_ERR_LOG_CORRUPT' });
  });

  describe('a 16 TiB volume with 64 KiB regions (2^28 regions), on sparse real files', () => {
    let dir = '';
    after(async () => {
      if (dir) await rm(dir, { recursive: true, force: true });
    });

    it('recovers in well under a second: the cost follows the log, not the volume', async (t) => {
      const regionCount = 2 ** 28;
      dir = await mkdtemp(join(tmpdir(), 'volrep-recover-'));
      const logFile = await NodeBlockFile.create(join(dir, 'log'), LogFile.fileBytes(1024 * 1024));
      const bmFile = await NodeBlockFile.create(join(dir, 'bitmap'), BitmapFile.fileBytes(regionCount));
      await LogFile.format(logFile);
      await BitmapFile.format(bmFile, regionCount);
      const { log } = await LogFile.open(logFile);
      let lsn = 0;
      for (let i = 0; i < 1000; i++) {
        const rec: LogRecord = { type: 'begin', lsn, idLimit: 1 << 20, ranges: [[i * 250_000, 1]] };
        log.append(rec);
        lsn += recordBytes(rec);
      }
      await log.flush();
      const t0 = performance.now();
      const r = await recover(logFile, bmFile, regionCount);
      const ms = performance.now() - t0;
      assert.equal(r.report.dirty, 1000);
      assert.ok(ms < 1000, `recovery took ${ms.toFixed(0)} ms`);
      t.diagnostic(`16 TiB / 2^28 regions, 1000 log records: recovery took ${ms.toFixed(0)} ms`);
      await logFile.close();
      await bmFile.close();
    });
  });
});
