/**
 * The library API in-process: `Volume.open` on a created volume, multi-write transactions
 * (data, zero, trim) that commit and read back, dirty tracking across region boundaries,
 * flush/close/reopen keeping the dirty set, and the refusals (second open, second commit,
 * out-of-range writes).
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { VolrepError } from '../../src/errors.js';
import { Volume } from '../../src/volume/replicated.js';
import { createVolume } from '../../src/volume/volume.js';
import { assertUsageError, volrepAsync } from '../helpers/clients.js';
import { tempDir } from '../helpers/daemon.js';

const K = 1024;
const M = 1024 * K;
const REGION = 64 * K;
const SIZE = 16 * M;

function filled(length: number, value: number): Buffer {
  return Buffer.alloc(length, value);
}

/** Regions [first, last] expanded into a sorted list. */
function expand(ranges: [number, number][]): number[] {
  const out: number[] = [];
  for (const [a, b] of ranges) for (let r = a; r <= b; r++) out.push(r);
  return out;
}

function fileBytes(file: string, offset: number, length: number): Buffer {
  return readFileSync(file).subarray(offset, offset + length);
}

async function rejectsUsage(p: Promise<unknown> | (() => unknown), pattern: RegExp): Promise<void> {
  const check = (err: unknown) => {
    assert.ok(err instanceof VolrepError, `expected a VolrepError, got ${String(err)}`);
    assert.equal(err.code === 'VOLREP_ERR_USAGE' || err.code === 'VOLREP_ERR_LOCKED', true, err.code);
    assert.match(err.message, pattern);
    return true;
  };
  if (typeof p === 'function') assert.throws(p, check);
  else await assert.rejects(p, check);
}

describe('library Volume API (in-process)', () => {
  const tmp = tempDir('volrep-lib-');
  const volumePath = path.join(tmp.dir, 'lib.img');
  let vol: Volume | undefined;

  before(async () => {
    await createVolume({ volumePath, size: SIZE, regionSize: REGION, logSize: 256 * K });
  });
  after(async () => {
    await vol?.close().catch(() => {});
    tmp.cleanup();
  });

  it('opens a fresh volume clean, with sane status', async () => {
    vol = await Volume.open(volumePath);
    assert.equal(vol.size, SIZE);
    assert.equal(vol.meta.regionSize, REGION);
    assert.deepEqual(vol.dirtyRanges(), []);
    const s = vol.status();
    assert.equal(s.dirtyRegions, 0);
    assert.equal(s.dirtyBytes, 0);
    assert.equal(s.pendingUpdates, 0);
    assert.ok(s.log.capacityBytes > 0 && s.log.capacityBytes <= 256 * K, JSON.stringify(s));
    assert.ok(s.log.usedBytes >= 0 && s.log.usedBytes <= s.log.capacityBytes, JSON.stringify(s));
  });

  it('a transaction with data, zero and trim writes commits and reads back', async () => {
    const v = vol!;
    // Background data in regions 2..4 first, so zero and trim have something to clear.
    await v
      .transaction()
      .write(2 * REGION, filled(3 * REGION, 0x11))
      .commit();
    await v
      .transaction()
      .write(2 * REGION + 4 * K, filled(8 * K, 0xa1))
      .zero(3 * REGION, 16 * K)
      .trim(4 * REGION + 32 * K, 8 * K)
      .write(4 * REGION + 60 * K, filled(4 * K, 0xa2))
      .commit();
    assert.deepEqual(await v.read(2 * REGION, 4 * K), filled(4 * K, 0x11));
    assert.deepEqual(await v.read(2 * REGION + 4 * K, 8 * K), filled(8 * K, 0xa1));
    assert.deepEqual(await v.read(2 * REGION + 12 * K, 4 * K), filled(4 * K, 0x11));
    assert.deepEqual(await v.read(3 * REGION, 16 * K), filled(16 * K, 0));
    assert.deepEqual(await v.read(3 * REGION + 16 * K, 4 * K), filled(4 * K, 0x11));
    assert.deepEqual(await v.read(4 * REGION + 32 * K, 8 * K), filled(8 * K, 0));
    assert.deepEqual(await v.read(4 * REGION + 40 * K, 4 * K), filled(4 * K, 0x11));
    assert.deepEqual(await v.read(4 * REGION + 60 * K, 4 * K), filled(4 * K, 0xa2));
    await v.flush();
    // And the file itself holds those bytes (flush made them durable; the page cache is coherent).
    assert.deepEqual(fileBytes(volumePath, 2 * REGION + 4 * K, 8 * K), filled(8 * K, 0xa1));
    assert.deepEqual(fileBytes(volumePath, 3 * REGION, 16 * K), filled(16 * K, 0));
    assert.deepEqual(fileBytes(volumePath, 4 * REGION + 60 * K, 4 * K), filled(4 * K, 0xa2));
    assert.deepEqual(v.dirtyRanges(), [[2, 4]]);
    assert.equal(v.status().dirtyRegions, 3);
    assert.equal(v.status().dirtyBytes, 3 * REGION);
  });

  it('a transaction across region boundaries marks every region it touches', async () => {
    const v = vol!;
    // 10: last 4 KiB of region 9 into region 10; 20..23: one write spanning four regions;
    // 40/41: a zero straddling the boundary; 60: a trim of exactly one region.
    await v
      .transaction()
      .write(10 * REGION - 4 * K, filled(8 * K, 0xb1))
      .write(20 * REGION + 512, filled(3 * REGION + 1024, 0xb2))
      .zero(41 * REGION - 512, 1024)
      .trim(60 * REGION, REGION)
      .commit();
    assert.deepEqual(v.dirtyRanges(), [
      [2, 4],
      [9, 10],
      [20, 23],
      [40, 41],
      [60, 60],
    ]);
    assert.deepEqual(await v.read(10 * REGION - 4 * K, 8 * K), filled(8 * K, 0xb1));
    assert.deepEqual(await v.read(20 * REGION + 512, 3 * REGION + 1024), filled(3 * REGION + 1024, 0xb2));
    assert.deepEqual(await v.read(20 * REGION, 512), filled(512, 0));
    assert.deepEqual(await v.read(23 * REGION + 1536, 512), filled(512, 0));
    // Last byte of the volume: the final region.
    await v
      .transaction()
      .write(SIZE - 1, filled(1, 0xee))
      .commit();
    assert.deepEqual(await v.read(SIZE - 1, 1), filled(1, 0xee));
    const last = SIZE / REGION - 1;
    assert.deepEqual(v.dirtyRanges().at(-1), [last, last]);
  });

  it('an empty transaction and zero-length writes commit and mark nothing', async () => {
    const v = vol!;
    const before = v.dirtyRanges();
    await v.transaction().commit();
    await v
      .transaction()
      .write(100 * REGION, Buffer.alloc(0))
      .zero(101 * REGION, 0)
      .commit();
    assert.deepEqual(v.dirtyRanges(), before);
  });

  it('concurrent transactions to overlapping ranges all complete; the later one wins', async () => {
    const v = vol!;
    const base = 70 * REGION;
    const commits: Promise<void>[] = [];
    for (let i = 0; i < 32; i++) {
      commits.push(
        v
          .transaction()
          .write(base + (i % 4) * 4 * K, filled(16 * K, i + 1))
          .commit(),
      );
    }
    await Promise.all(commits);
    // Writes to overlapping ranges reach the volume in submission order (H9): the last four
    // writes (i = 28..31) decide the bytes at their own offsets.
    assert.deepEqual(await v.read(base, 4 * K), filled(4 * K, 29));
    assert.deepEqual(await v.read(base + 4 * K, 4 * K), filled(4 * K, 30));
    assert.deepEqual(await v.read(base + 8 * K, 4 * K), filled(4 * K, 31));
    assert.deepEqual(await v.read(base + 12 * K, 16 * K), filled(16 * K, 32));
    const dirty = expand(v.dirtyRanges());
    assert.ok(dirty.includes(70) && !dirty.includes(69) && !dirty.includes(71), JSON.stringify(dirty));
  });

  it('committing twice is refused, and so is adding to a committed transaction', async () => {
    const v = vol!;
    const tx = v.transaction().write(80 * REGION, filled(4 * K, 0xc1));
    await tx.commit();
    await rejectsUsage(tx.commit(), /already committed/);
    await rejectsUsage(() => tx.write(80 * REGION, filled(4 * K, 0xc2)), /already committed/);
    // The refused second commit wrote nothing.
    assert.deepEqual(await v.read(80 * REGION, 4 * K), filled(4 * K, 0xc1));
  });

  it('out-of-range and invalid writes and reads are refused with a VolrepError, before any I/O', async () => {
    const v = vol!;
    const before = v.dirtyRanges();
    await rejectsUsage(() => v.transaction().write(SIZE - 4 * K, filled(8 * K, 1)), /beyond the volume/);
    await rejectsUsage(() => v.transaction().write(SIZE, filled(1, 1)), /beyond the volume/);
    await rejectsUsage(() => v.transaction().zero(SIZE - 512, 1024), /beyond the volume/);
    await rejectsUsage(() => v.transaction().trim(0, SIZE + 1), /beyond the volume/);
    await rejectsUsage(() => v.transaction().write(-4096, filled(4096, 1)), /invalid range/);
    await rejectsUsage(() => v.transaction().zero(1.5, 10), /invalid range/);
    await rejectsUsage(() => v.transaction().trim(0, -1), /invalid range/);
    await rejectsUsage(() => v.transaction().write(2 ** 60, filled(1, 1)), /invalid range|beyond/);
    await rejectsUsage(() => v.read(SIZE - 1, 2), /beyond the volume/);
    // A transaction where one write of several is out of range: the builder throws at that
    // write, and the earlier writes are never committed.
    const tx = v.transaction().write(90 * REGION, filled(4 * K, 0xd1));
    await rejectsUsage(() => tx.write(SIZE, filled(1, 1)), /beyond the volume/);
    assert.deepEqual(v.dirtyRanges(), before);
    assert.deepEqual(await v.read(90 * REGION, 4 * K), filled(4 * K, 0));
  });

  it('flush, close and reopen keep the same dirty set and data', async () => {
    const v = vol!;
    await v.flush();
    const dirty = v.dirtyRanges();
    assert.ok(dirty.length >= 5, JSON.stringify(dirty));
    await v.close();
    vol = undefined;
    vol = await Volume.open(volumePath);
    assert.deepEqual(vol.dirtyRanges(), dirty);
    // The bitmap was persisted at close: recovery found it all in the bitmap.
    assert.equal(vol.recovery.bitmapDirty, expand(dirty).length);
    assert.equal(vol.status().dirtyRegions, expand(dirty).length);
    assert.deepEqual(await vol.read(2 * REGION + 4 * K, 8 * K), filled(8 * K, 0xa1));
    assert.deepEqual(await vol.read(SIZE - 1, 1), filled(1, 0xee));
    // New writes after reopen add to the set.
    await vol
      .transaction()
      .write(200 * REGION - 512, filled(1024, 0x42))
      .commit();
    assert.deepEqual(
      expand(vol.dirtyRanges()),
      [...new Set([...expand(dirty), 199, 200])].sort((a, b) => a - b),
    );
    await vol.close();
    vol = undefined;
    // After close the lock is released: another open succeeds.
    vol = await Volume.open(volumePath);
    assert.ok(expand(vol.dirtyRanges()).includes(199));
    await vol.close();
    vol = undefined;
  });

  it('using a closed volume is refused, not a crash', async () => {
    const v = await Volume.open(volumePath);
    await v.close();
    const outcome = await Promise.race([
      v
        .transaction()
        .write(0, filled(512, 1))
        .commit()
        .then(
          () => 'resolved',
          () => 'rejected',
        ),
      new Promise<string>((resolve) => setTimeout(() => resolve('hung'), 3000).unref()),
    ]);
    assert.equal(outcome, 'rejected', 'a write on a closed volume must be refused');
  });
});

describe('library Volume API: the volume lock', () => {
  const tmp = tempDir('volrep-lib-lock-');
  const volumePath = path.join(tmp.dir, 'lock.img');
  const open: Volume[] = [];

  before(async () => {
    await createVolume({ volumePath, size: SIZE, regionSize: REGION, logSize: 256 * K });
  });
  after(async () => {
    for (const v of open) await v.close().catch(() => {});
    tmp.cleanup();
  });

  it('a volrep primary process is refused while the library holds the volume', async () => {
    const v = await Volume.open(volumePath);
    open.push(v);
    const r = await volrepAsync(['primary', '--volume', volumePath, '--nbd', '127.0.0.1:0'], 15_000);
    assertUsageError(r, /in use by another volrep process/);
    await v.close();
    open.pop();
  });

  it('a second Volume.open in the same process is refused while the first is open', async () => {
    const first = await Volume.open(volumePath);
    open.push(first);
    for (const r of [2, 3, 4, 9, 10, 20, 40, 60]) {
      await first
        .transaction()
        .write(r * REGION, filled(4 * K, 0x22))
        .commit();
    }
    const second = await Volume.open(volumePath).then(
      (v) => v,
      (err: unknown) => err,
    );
    if (!(second instanceof Volume)) {
      assert.ok(second instanceof VolrepError, `expected a VolrepError, got ${String(second)}`);
      assert.equal(second.code, 'VOLREP_ERR_LOCKED');
      return;
    }
    // Not refused: show what two engines on one metadata directory cost. The intruder closes
    // first; then the first handle writes region 5, closes (persisting its bitmap), and a
    // reopen should find region 5 dirty.
    await second.close();
    await first
      .transaction()
      .write(5 * REGION, filled(4 * K, 0x55))
      .commit();
    const before = first.dirtyRanges();
    await first.close();
    open.pop();
    const again = await Volume.open(volumePath);
    open.push(again);
    const afterReopen = again.dirtyRanges();
    assert.fail(
      'a second Volume.open of an open volume (same process) succeeded; ' +
        `dirty before close ${JSON.stringify(before)}, after reopen ${JSON.stringify(afterReopen)}, ` +
        `recovery ${JSON.stringify(again.recovery)}`,
    );
  });
});
