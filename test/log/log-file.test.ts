import assert from 'node:assert/strict';
import { mkdtemp, rm, stat, truncate } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import fc from 'fast-check';
import type { LogRecord } from '../../src/core/records.js';
import { recordBytes } from '../../src/core/records.js';
import { type BlockFile, NodeBlockFile } from '../../src/io/block-file.js';
import {
  decodeRecord,
  encodeHeader,
  encodeRecord,
  LOG_DATA_OFFSET,
  LOG_FORMAT_VERSION,
  LOG_HEADER_SLOT_BYTES,
} from '../../src/log/format.js';
import { LogFile, SCAN_WINDOW_BYTES } from '../../src/log/log-file.js';
import { Prng } from '../sim/prng.js';
import { SimDisk } from '../sim/sim-disk.js';

const seed = process.env.VOLREP_SEED ? Number(process.env.VOLREP_SEED) : undefined;

/** Builds records at consecutive lsns from `lsn`. */
class Records {
  constructor(public lsn = 0) {}
  list: LogRecord[] = [];
  begin(ranges: Array<[number, number]>, idLimit = 10): LogRecord {
    return this.add({ type: 'begin', lsn: this.lsn, idLimit, ranges });
  }
  complete(begins: number[]): LogRecord {
    return this.add({ type: 'complete', lsn: this.lsn, idLimit: 10, begins });
  }
  add(r: LogRecord): LogRecord {
    this.list.push(r);
    this.lsn += recordBytes(r);
    return r;
  }
}

/** A BlockFile whose next sync waits until released (a header write held in flight). */
class GatedFile implements BlockFile {
  holdNextSync = false;
  private resolveHeld: () => void = () => {};
  held = new Promise<void>((r) => (this.resolveHeld = r));
  private releaseSync: () => void = () => {};
  constructor(private readonly disk: SimDisk) {}
  get size(): number {
    return this.disk.size;
  }
  read(offset: number, length: number): Promise<Uint8Array> {
    return this.disk.read(offset, length);
  }
  write(offset: number, data: Uint8Array): Promise<void> {
    this.wrote = true;
    return this.disk.write(offset, data);
  }
  /** Hold the first sync that follows a write (and leave syncs of nothing alone). */
  holdSyncAfterWrite = false;
  private wrote = false;
  async sync(): Promise<void> {
    const afterWrite = this.wrote;
    this.wrote = false;
    if (this.holdNextSync || (this.holdSyncAfterWrite && afterWrite)) {
      this.holdNextSync = false;
      this.holdSyncAfterWrite = false;
      const wait = new Promise<void>((r) => (this.releaseSync = r));
      this.resolveHeld();
      await wait;
    }
    return this.disk.sync();
  }
  release(): void {
    this.releaseSync();
  }
}

async function fresh(capacity = 4096): Promise<SimDisk> {
  const disk = new SimDisk(LogFile.fileBytes(capacity));
  await LogFile.format(disk);
  return disk;
}

describe('log record format', () => {
  it('round-trips every record type', () => {
    const recs: LogRecord[] = [
      {
        type: 'begin',
        lsn: 2 ** 40,
        idLimit: 2 ** 50,
        ranges: [
          [0, 1],
          [2 ** 32 - 1, 1],
        ],
      },
      { type: 'complete', lsn: 8, idLimit: 1, begins: [0, 96, 2 ** 45] },
      { type: 'checkpoint', lsn: 16, idLimit: 7, checkpointId: 3, coveredLsn: 8 },
      { type: 'reserve', lsn: 24, idLimit: 1 << 20 },
    ];
    for (const r of recs) {
      const bytes = encodeRecord(r);
      assert.equal(bytes.length, recordBytes(r));
      assert.deepEqual(decodeRecord(bytes, r.lsn), r);
      assert.equal(decodeRecord(bytes, r.lsn + 8), undefined, 'a record is valid only at its own lsn');
    }
  });

  it('never throws on random bytes (I7)', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 600 }), fc.nat(), (bytes, lsn) => {
        decodeRecord(bytes, lsn);
      }),
      { seed, numRuns: 500 },
    );
  });

  it('rejects a record with any single byte changed', () => {
    const r = encodeRecord({ type: 'begin', lsn: 64, idLimit: 9, ranges: [[5, 3]] });
    for (let i = 0; i < r.length; i++) {
      const bad = r.slice();
      bad[i] ^= 0x40;
      assert.equal(decodeRecord(bad, 64), undefined, `byte ${i}`);
    }
  });
});

describe('LogFile', () => {
  it('formats an empty log and reopens it', async () => {
    const disk = await fresh();
    const { log, scan } = await LogFile.open(disk);
    assert.deepEqual(scan.records, []);
    assert.equal(scan.headLsn, 0);
    assert.equal(scan.tailLsn, 0);
    assert.equal(scan.end, 'clean');
    assert.equal(log.capacity, 4096);
  });

  it('inspect reads the log without writing to it', async () => {
    const disk = await fresh();
    const { log } = await LogFile.open(disk);
    const rs = new Records();
    log.append(rs.begin([[1, 1]]));
    await log.flush();
    const writes = disk.writes;
    const scan = await LogFile.inspect(disk);
    assert.deepEqual(scan.records, rs.list);
    assert.equal(disk.writes, writes);
  });

  it('group commit: records appended together go out in one write and one sync', async () => {
    const disk = await fresh();
    const { log } = await LogFile.open(disk);
    const rs = new Records();
    for (let i = 0; i < 10; i++) log.append(rs.begin([[i, 1]]));
    const writes = disk.writes;
    const syncs = disk.syncs;
    const durable = await log.flush();
    assert.equal(disk.writes - writes, 1);
    assert.equal(disk.syncs - syncs, 1);
    assert.equal(durable, rs.lsn);
    const { scan } = await LogFile.open(disk);
    assert.deepEqual(scan.records, rs.list);
    assert.equal(scan.headLsn, rs.lsn);
  });

  it('a torn final record ends the log; the records before it survive', async () => {
    for (let s = 0; s < 40; s++) {
      const disk = await fresh();
      const { log } = await LogFile.open(disk);
      const rs = new Records();
      log.append(rs.begin([[1, 1]]));
      log.append(rs.begin([[2, 2]]));
      await log.flush();
      const synced = rs.list.slice();
      log.append(rs.begin([[3, 1]]));
      log.append(rs.complete([0]));
      await log.writeBatch();
      const [mode] = disk.crash(new Prng(s), ['partial', 'corrupt', 'absent']);
      const { scan } = await LogFile.open(disk);
      assert.deepEqual(scan.records.slice(0, 2), synced, `seed ${s} (${mode})`);
      // Whatever survived of the unsynced batch is a prefix of it.
      assert.deepEqual(scan.records, rs.list.slice(0, scan.records.length), `seed ${s} (${mode})`);
    }
  });

  it('a corrupt record in the middle ends the scan there', async () => {
    const disk = await fresh();
    const { log } = await LogFile.open(disk);
    const rs = new Records();
    log.append(rs.begin([[1, 1]]));
    const second = rs.begin([[2, 1]]);
    log.append(second);
    log.append(rs.begin([[3, 1]]));
    await log.flush();
    disk.poke(LOG_DATA_OFFSET + second.lsn + 40, new Uint8Array([0xee]));
    const { scan } = await LogFile.open(disk);
    assert.deepEqual(scan.records, rs.list.slice(0, 1));
    assert.equal(scan.headLsn, second.lsn);
    assert.equal(scan.end, 'torn');
  });

  it('wraps around the end of the ring, with records straddling it', async () => {
    const capacity = 1024;
    const disk = await fresh(capacity);
    let { log } = await LogFile.open(disk);
    const rs = new Records();
    const live: LogRecord[] = [];
    for (let i = 0; i < 200; i++) {
      const r = rs.begin(
        Array.from({ length: 1 + (i % 3) }, (_, k) => [i * 4 + k, 1] as [number, number]),
        i + 1,
      );
      // Keep at most ~600 bytes live: free the oldest records first.
      while (live.length > 0 && rs.lsn - live[0].lsn > 600) live.shift();
      log.setTail(live[0]?.lsn ?? r.lsn, 1);
      log.append(r);
      live.push(r);
      if (i % 7 === 6) {
        await log.flush();
        const reopened = await LogFile.open(disk);
        assert.deepEqual(reopened.scan.records.slice(-live.length), live);
        assert.equal(reopened.scan.headLsn, rs.lsn);
        log = reopened.log;
      }
    }
    assert.ok(rs.lsn > 10 * capacity, 'wrapped many times');
  });

  it('scans a log larger than its read window a window at a time, across window edges and the wrap', async () => {
    const capacity = 2 * SCAN_WINDOW_BYTES + 4096;
    const disk = await fresh(capacity);
    const { log } = await LogFile.open(disk);
    const rs = new Records();
    const live: LogRecord[] = [];
    // ~1 KiB records, about 1.5 windows of them live, the ring wrapped more than once.
    for (let i = 0; rs.lsn < 2.5 * capacity; i++) {
      const r = rs.begin(
        Array.from({ length: 60 + (i % 7) }, (_, k) => [i * 70 + k, 1] as [number, number]),
        i + 1,
      );
      while (live.length > 0 && rs.lsn - live[0].lsn > 1.5 * SCAN_WINDOW_BYTES) live.shift();
      log.setTail(live[0]?.lsn ?? r.lsn, 1);
      log.append(r);
      live.push(r);
      if (i % 500 === 499) await log.flush();
    }
    await log.flush();
    const reads: number[] = [];
    const counting: BlockFile = {
      get size() {
        return disk.size;
      },
      read: (offset, length) => {
        reads.push(length);
        return disk.read(offset, length);
      },
      write: (offset, data) => disk.write(offset, data),
      sync: () => disk.sync(),
    };
    const reopened = await LogFile.open(counting);
    assert.deepEqual(reopened.scan.records.slice(-live.length), live);
    assert.equal(reopened.scan.headLsn, rs.lsn);
    assert.ok(Math.max(...reads) <= SCAN_WINDOW_BYTES, `reads of at most a window: ${Math.max(...reads)}`);
  });

  it('refuses to overrun live records (the engine checks space first)', async () => {
    const disk = await fresh(1024);
    const { log } = await LogFile.open(disk);
    const rs = new Records();
    assert.throws(() => {
      for (let i = 0; i < 100; i++) log.append(rs.begin([[i, 1]]));
    }, /log overrun/);
  });

  it('a tail move is durable before the freed space is reused', async () => {
    const disk = await fresh(1024);
    const { log } = await LogFile.open(disk);
    const rs = new Records();
    for (let i = 0; i < 15; i++) log.append(rs.begin([[i, 1]]));
    await log.flush();
    // Free the first 10, then write over their space and crash before the sync.
    log.setTail(rs.list[10].lsn, 1);
    for (let i = 0; i < 8; i++) log.append(rs.begin([[100 + i, 1]]));
    await log.writeBatch();
    disk.crash(new Prng(1), ['whole']);
    const { scan } = await LogFile.open(disk);
    assert.equal(scan.tailLsn, rs.list[10].lsn);
    assert.deepEqual(scan.records, rs.list.slice(10));
  });

  it('records appended while the header write is in flight wait for the next batch (defect 3)', async () => {
    // The engine freed space (tail move 1), asked for a sync; while the header carrying that tail
    // is being written, a second checkpoint frees more (tail move 2) and the engine appends into
    // the space move 2 freed. Those records must not join the batch in flight: its header only
    // carries move 1, so writing them would overrun records still live by that header.
    const disk = await fresh(1024);
    const gated = new GatedFile(disk);
    const { log } = await LogFile.open(gated);
    const rs = new Records();
    while (rs.lsn + 56 <= 1024) log.append(rs.begin([[rs.list.length, 1]]));
    await log.flush();
    log.setTail(rs.list[4].lsn, 1); // move 1: four records free
    log.append(rs.begin([[100, 1]]));
    const throughLsn = rs.lsn;
    gated.holdNextSync = true;
    const batch = log.writeBatch(); // writes the header (move 1), holds at its sync
    await gated.held;
    log.setTail(rs.list[12].lsn, 1); // move 2, while the header is in flight
    while (rs.lsn + 56 - rs.list[12].lsn <= 1024) log.append(rs.begin([[200 + rs.list.length, 1]]));
    gated.release();
    const first = await batch;
    assert.equal(first.throughLsn, throughLsn, 'the batch holds exactly what was appended before the call');
    await log.syncBatch(first);
    assert.equal(log.durableLsn, throughLsn);
    // The next batch carries move 2 first, then the rest; all of it survives a reopen.
    await log.flush();
    const { scan } = await LogFile.open(disk);
    assert.equal(scan.tailLsn, rs.list[12].lsn);
    assert.deepEqual(scan.records, rs.list.slice(12));
  });

  it('a header a killed process left unsynced is made durable before the next open rewrites the other slot', async () => {
    // Process 1 moves the tail: its header write lands in the page cache, and it is killed before
    // the sync. Process 2 opens the log, reads that header, and writes its own (new epoch) to the
    // other slot — the one holding the last durable header. A power loss then must not leave
    // only a header that predates process 1's epoch (its records would be thrown away).
    const disk = await fresh(1024);
    const gated = new GatedFile(disk);
    const { log } = await LogFile.open(gated); // process 1: epoch 1, its header durable
    const rs = new Records();
    for (let i = 0; i < 6; i++) log.append(rs.begin([[i, 1]]));
    await log.flush();
    log.setTail(rs.list[2].lsn, 1);
    log.append(rs.begin([[50, 1]]));
    gated.holdNextSync = true;
    void log.writeBatch(); // the tail-move header is written; its sync never comes: killed
    await gated.held;
    // Process 2 opens; power is lost right after it wrote its header, before that header's sync.
    const second = new GatedFile(disk);
    second.holdSyncAfterWrite = true;
    void LogFile.open(second);
    await second.held;
    // Power loss: what was not synced is gone, and process 2's header write tore its slot.
    disk.crash(new Prng(1), ['absent']);
    disk.poke(LOG_HEADER_SLOT_BYTES, new Uint8Array(LOG_HEADER_SLOT_BYTES).fill(0xee));
    const after = await LogFile.open(disk);
    assert.deepEqual(
      after.scan.records
        .filter((r) => r.type === 'begin')
        .map((r) => (r.type === 'begin' ? r.ranges[0][0] : -1)),
      [2, 3, 4, 5],
      'the records of the killed process are still the log',
    );
  });

  it('leftovers of an earlier boot beyond a torn record never rejoin the log (epochs)', async () => {
    const disk = await fresh();
    const { log } = await LogFile.open(disk); // epoch 1
    const rs = new Records();
    log.append(rs.begin([[1, 1]]));
    await log.flush();
    // A batch of which the first record is damaged but the next ones landed whole.
    const torn = rs.begin([[2, 1]]);
    const leftover = rs.complete([0]);
    disk.poke(LOG_DATA_OFFSET + torn.lsn, encodeRecord(torn, 1).fill(0xaa, 40));
    disk.poke(LOG_DATA_OFFSET + leftover.lsn, encodeRecord(leftover, 1));
    const reopened = await LogFile.open(disk); // epoch 2
    assert.equal(reopened.scan.headLsn, torn.lsn);
    // The next boot writes a record of exactly the torn one's size: the leftover lines up.
    reopened.log.append({ type: 'begin', lsn: torn.lsn, idLimit: 10, ranges: [[7, 1]] });
    await reopened.log.flush();
    const { scan } = await LogFile.open(disk);
    assert.deepEqual(
      scan.records.map((r) => r.type),
      ['begin', 'begin'],
      'the old completion (which would cancel the first begin) is not read',
    );
  });

  it('falls back to the other header slot when the newest is torn', async () => {
    const disk = await fresh(1024);
    const { log } = await LogFile.open(disk);
    const rs = new Records();
    log.append(rs.begin([[1, 1]]));
    log.append(rs.begin([[2, 1]]));
    await log.flush();
    log.setTail(rs.list[1].lsn, 5);
    await log.flush(); // open wrote header seq 1 (slot 1); this tail move writes seq 2 (slot 0)
    disk.poke(10, new Uint8Array([0xff])); // tear slot 0
    const { scan } = await LogFile.open(disk);
    assert.equal(scan.tailLsn, 0, 'the older header (slot 1) wins');
    assert.deepEqual(scan.records, rs.list);
  });

  it('refuses an empty, truncated or headerless file with a clear error', async () => {
    await assert.rejects(LogFile.open(new SimDisk(0)), { code: 'VOLREP_ERR_LOG_SIZE' });
    await assert.rejects(LogFile.open(new SimDisk(100)), { code: 'VOLREP_ERR_LOG_SIZE' });
    await assert.rejects(LogFile.open(new SimDisk(LogFile.fileBytes(4096))), {
      code: 'VOLREP_ERR_LOG_CORRUPT',
      message: /no valid header/,
    });
    const disk = await fresh(4096);
    const short = new SimDisk(disk.size - 512);
    short.poke(0, await disk.read(0, short.size));
    await assert.rejects(LogFile.open(short), { code: 'VOLREP_ERR_LOG_SIZE', message: /truncated/ });
    await assert.rejects(LogFile.format(new SimDisk(LOG_DATA_OFFSET + 100)), { code: 'VOLREP_ERR_LOG_SIZE' });
  });

  it('refuses a log from a newer format version', async () => {
    const disk = await fresh();
    disk.poke(
      LOG_HEADER_SLOT_BYTES,
      encodeHeader({
        version: LOG_FORMAT_VERSION + 1,
        epoch: 0,
        seq: 9,
        capacity: 4096,
        tailLsn: 0,
        idLimit: 1,
      }),
    );
    await assert.rejects(LogFile.open(disk), {
      code: 'VOLREP_ERR_LOG_VERSION',
      message: /version 2 is newer .* upgrade volrep/,
    });
  });

  it('never crashes on a file of random bytes (I7)', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.uint8Array({ minLength: 0, maxLength: 64 }),
        fc.nat({ max: 3 }),
        async (noise, where) => {
          const disk = await fresh(1024);
          const { log } = await LogFile.open(disk);
          const rs = new Records();
          for (let i = 0; i < 5; i++) log.append(rs.begin([[i, 1]]));
          await log.flush();
          const at = [0, LOG_HEADER_SLOT_BYTES, LOG_DATA_OFFSET, LOG_DATA_OFFSET + 60][where];
          disk.poke(at, noise);
          try {
            const { scan } = await LogFile.open(disk);
            assert.deepEqual(scan.records, rs.list.slice(0, scan.records.length));
          } catch (err) {
            assert.match((err as { code?: string }).code ?? '', /^VOLREP_ERR_LOG_/);
          }
        },
      ),
      { seed, numRuns: 200 },
    );
  });

  describe('on a real file', () => {
    let dir = '';
    after(async () => {
      if (dir) await rm(dir, { recursive: true, force: true });
    });

    it('formats, appends, flushes and reopens through node:fs', async () => {
      dir = await mkdtemp(join(tmpdir(), 'volrep-log-'));
      const path = join(dir, 'log');
      const created = await NodeBlockFile.create(path, LogFile.fileBytes(64 * 1024));
      await LogFile.format(created);
      const { log } = await LogFile.open(created);
      const rs = new Records();
      for (let i = 0; i < 50; i++) log.append(rs.begin([[i, 2]]));
      log.append(rs.complete([0, 56]));
      await log.flush();
      await created.close();
      const file = await NodeBlockFile.open(path);
      const { scan } = await LogFile.open(file);
      assert.deepEqual(scan.records, rs.list);
      await file.close();
      await truncate(path, 1000);
      assert.equal((await stat(path)).size, 1000);
      const short = await NodeBlockFile.open(path);
      await assert.rejects(LogFile.open(short), { code: 'VOLREP_ERR_LOG_SIZE' });
      await short.close();
    });
  });
});
