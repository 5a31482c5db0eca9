/** Example-based tests of the engine core: each pins down one rule with a small scenario. */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { type Action, Engine, type EngineConfig, type WriteRequest } from '../../src/core/engine.js';
import { IndicatorMap } from '../../src/core/indicator-map.js';

const KiB = 1024;

const base: EngineConfig = {
  volumeSize: 64 * 64 * KiB,
  regionSize: 64 * KiB,
  logCapacity: 64 * KiB,
  activityWindowRegions: 16,
  inflightBytesMax: 1024 * KiB,
  ackTimeoutMs: 5000,
  volumeWritesDurable: true,
};

/**
 * A shell that performs every action at once (log syncs, volume writes, resync reads, bitmap
 * persists) and keeps what went on the wire; acks are up to the test.
 */
class Shell {
  readonly engine: Engine;
  now = 0;
  sent: Extract<Action, { type: 'send' }>[] = [];
  /** Each checkpoint's bitmap, as persisted. */
  readonly bitmaps = new Map<number, Uint8Array>();
  all: Action[] = [];
  counts: Record<string, number> = {};
  auto = { log: true, volume: true, bitmap: true, reads: true, volumeSync: true };

  constructor(config: EngineConfig, engine?: Engine) {
    this.engine = engine ?? new Engine(config);
    this.run();
  }

  write(...writes: WriteRequest[]): number {
    const id = this.engine.submitTransaction(writes, this.now);
    this.run();
    return id;
  }

  ackAll(): void {
    const last = this.sent.at(-1);
    if (last) this.engine.handleAck(last.updateId, this.now);
    this.run();
  }

  run(): void {
    const later: Array<() => void> = [];
    for (let i = 0; i < 100_000; i++) {
      const a = this.engine.pollAction();
      if (a === undefined) {
        const next = later.shift();
        if (next === undefined) return;
        next();
        continue;
      }
      this.all.push(a);
      this.counts[a.type] = (this.counts[a.type] ?? 0) + 1;
      switch (a.type) {
        case 'syncLog':
          if (this.auto.log) later.push(() => this.engine.handleLogSynced(a.throughLsn, this.now));
          break;
        case 'writeVolume':
          if (this.auto.volume) later.push(() => this.engine.handleVolumeWritten(a.updateId, this.now));
          break;
        case 'readRegion':
          if (this.auto.reads) later.push(() => this.engine.handleResyncRead(a.updateId, this.now));
          break;
        case 'persistBitmap':
          this.bitmaps.set(a.checkpointId, a.bitmap.readAll());
          if (this.auto.bitmap) later.push(() => this.engine.handleBitmapPersisted(a.checkpointId, this.now));
          break;
        case 'syncVolume':
          if (this.auto.volumeSync) later.push(() => this.engine.handleVolumeSynced(a.syncId, this.now));
          break;
        case 'send':
          this.sent.push(a);
          break;
        case 'disconnect':
          later.push(() => this.engine.handleDisconnected(this.now));
          break;
        default:
          break;
      }
    }
    assert.fail('the engine does not settle');
  }

  count(type: Action['type']): number {
    return this.counts[type] ?? 0;
  }

  last<T extends Action['type']>(type: T): Extract<Action, { type: T }> | undefined {
    return this.all.filter((a): a is Extract<Action, { type: T }> => a.type === type).at(-1);
  }
}

function w(offset: number, length = 4096, kind: WriteRequest['kind'] = 'data'): WriteRequest {
  return { offset, length, kind };
}

describe('Engine', () => {
  it('marks, logs, syncs, writes the volume, then sends and completes (steps 1-3)', () => {
    const s = new Shell(base);
    s.engine.handleConnected(0, 0);
    s.run();
    const tx = s.write(w(0), w(3 * 64 * KiB + 100, 200_000));
    const types = s.all.map((a) => a.type);
    assert.deepEqual(
      types.slice(0, 2),
      ['appendLog', 'syncLog'],
      'one begin record (with the id limit), one sync',
    );
    const begin = s.all.find((a) => a.type === 'appendLog' && a.record.type === 'begin');
    assert.ok(begin?.type === 'appendLog' && begin.record.type === 'begin');
    assert.ok(begin.record.idLimit > 2, 'H14: the record reserves the ids it uses');
    assert.deepEqual(begin.record.ranges, [
      [0, 1],
      [3, 4],
    ]);
    assert.ok(types.indexOf('writeVolume') > types.indexOf('syncLog'), 'I2: the volume write after the sync');
    assert.deepEqual(
      s.sent.map((x) => x.updateId),
      [1, 2],
    );
    assert.ok(s.all.some((a) => a.type === 'complete' && a.txId === tx));
    assert.equal(s.engine.indicator.count, 5);
    s.ackAll();
    assert.equal(s.engine.indicator.count, 0, 'acked: clean');
  });

  it('a hot working set that fits the activity window costs no log sync per write', () => {
    const s = new Shell({ ...base, activityWindowRegions: 32 });
    s.engine.handleConnected(0, 0);
    for (let r = 0; r < 32; r++) s.write(w(r * 64 * KiB));
    s.ackAll();
    const syncs = s.count('syncLog');
    let x = 12345;
    for (let i = 0; i < 2000; i++) {
      x = (x * 1103515245 + 12345) % 2 ** 31;
      s.write(w((x % 32) * 64 * KiB + (x % 15) * 4096));
      if (i % 10 === 9) s.ackAll();
    }
    assert.equal(s.count('syncLog'), syncs, 'no sync for 2000 writes in the window');
    assert.equal(s.count('writeVolume'), 2032);
  });

  it('H1: a checkpoint ends the coverage of every record: the next write logs again', () => {
    const s = new Shell(base);
    s.engine.handleConnected(0, 0);
    s.write(w(0));
    s.ackAll();
    assert.ok(s.engine.isCovered(0));
    s.engine.requestCheckpoint(s.now);
    s.run();
    assert.ok(!s.engine.isCovered(0));
    const appends = s.count('appendLog');
    s.write(w(0));
    const begins = s.all.slice(-10).filter((a) => a.type === 'appendLog' && a.record.type === 'begin');
    assert.ok(s.count('appendLog') > appends && begins.length === 1, 'a new begin record');
  });

  it('H6: a write covered by an appended but unsynced record waits for that sync', () => {
    const s = new Shell(base);
    s.auto.log = false;
    s.write(w(0));
    s.write(w(8192));
    assert.equal(s.count('writeVolume'), 0);
    assert.equal(s.count('syncLog'), 1, 'group commit: one sync in flight');
    const sync = s.all.find((a) => a.type === 'syncLog');
    assert.ok(sync?.type === 'syncLog');
    s.engine.handleLogSynced(sync.throughLsn, 0);
    s.run();
    assert.equal(s.count('writeVolume'), 2, 'both go after the sync that carries the record');
  });

  it('H9: overlapping writes reach the volume one at a time, in id order', () => {
    const s = new Shell(base);
    s.auto.volume = false;
    s.write(w(0, 8192));
    s.write(w(4096, 8192));
    s.write(w(64 * KiB));
    const issued = s.all.filter((a) => a.type === 'writeVolume');
    assert.deepEqual(
      issued.map((a) => a.updateId),
      [1, 3],
      'u2 overlaps u1 and waits',
    );
    s.engine.handleVolumeWritten(1, 0);
    s.run();
    assert.deepEqual(
      s.all.filter((a) => a.type === 'writeVolume').map((a) => a.updateId),
      [1, 3, 2],
    );
  });

  it('H10: updates go on the stream in id order even when the volume finishes out of order', () => {
    const s = new Shell(base);
    s.auto.volume = false;
    s.engine.handleConnected(0, 0);
    s.write(w(0));
    s.write(w(64 * KiB));
    s.engine.handleVolumeWritten(2, 0);
    s.run();
    assert.equal(s.sent.length, 0, 'u2 waits for u1');
    s.engine.handleVolumeWritten(1, 0);
    s.run();
    assert.deepEqual(
      s.sent.map((a) => a.updateId),
      [1, 2],
    );
  });

  it('H3/H12: a cumulative ack resets only the regions whose last id it removed', () => {
    const s = new Shell(base);
    s.engine.handleConnected(0, 0);
    s.write(w(0));
    s.write(w(64 * KiB));
    s.write(w(100)); // region 0 again: u3
    s.engine.handleAck(2, 0);
    s.run();
    assert.ok(s.engine.indicator.test(0), 'u3 still pending on region 0');
    assert.ok(!s.engine.indicator.test(1));
    s.engine.handleAck(3, 0);
    s.run();
    assert.ok(!s.engine.indicator.test(0));
  });

  it('H12: a region dirty from a lost update stays dirty when a later partial write is acked', () => {
    const s = new Shell(base);
    s.engine.handleConnected(0, 0);
    s.write(w(0, 512));
    s.engine.handleDisconnected(0); // u1 is lost
    s.run();
    s.engine.handleConnected(0, 0);
    s.auto.reads = false; // hold the resync read
    s.run();
    s.write(w(4096, 512)); // waits behind the resync read (H8)
    const read = s.all.find((a) => a.type === 'readRegion');
    assert.ok(read?.type === 'readRegion' && read.region === 0);
    assert.ok(
      !s.all.some((a) => a.type === 'writeVolume' && a.offset === 4096),
      'H8: the write waits for the read',
    );
    s.engine.handleResyncRead(read.updateId, 0);
    s.run();
    assert.deepEqual(
      s.sent.map((a) => [a.updateId, a.source.type]),
      [
        [1, 'write'],
        [2, 'resync'],
        [3, 'write'],
      ],
    );
    s.engine.handleAck(2, 0);
    s.run();
    assert.ok(s.engine.indicator.test(0), 'u3 pending');
    s.engine.handleAck(3, 0);
    s.run();
    assert.equal(s.engine.indicator.count, 0);
  });

  it('standalone (never connected): writes mark and log, regions stay dirty, updates are dropped', () => {
    const s = new Shell(base);
    s.write(w(0), w(10 * 64 * KiB, 100, 'trim'));
    assert.equal(s.count('dropUpdate'), 2);
    assert.equal(s.count('send'), 0);
    assert.equal(s.engine.indicator.count, 2);
    assert.equal(s.count('complete'), 1);
    // Connecting resyncs them.
    s.engine.handleConnected(0, 0);
    s.run();
    assert.deepEqual(
      s.sent.map((a) => [a.source.type, a.offset, a.length]),
      [
        ['resync', 0, 64 * KiB],
        ['resync', 10 * 64 * KiB, 64 * KiB],
      ],
    );
    s.ackAll();
    assert.equal(s.engine.indicator.count, 0);
  });

  it('H7: TRIM and WRITE_ZEROES are logged, sent and tracked like writes', () => {
    const s = new Shell(base);
    s.engine.handleConnected(0, 0);
    s.write(w(0, 4096, 'trim'), w(64 * KiB, 4096, 'zero'));
    assert.deepEqual(
      s.sent.map((a) => a.kind),
      ['trim', 'zero'],
    );
    assert.equal(s.engine.indicator.count, 2);
    s.ackAll();
    assert.equal(s.engine.indicator.count, 0);
  });

  it('a full log is folded into the bitmap; writes never block forever', () => {
    const config = {
      ...base,
      regionSize: 4 * KiB,
      logCapacity: 4096,
      txWritesMax: 4,
      activityWindowRegions: 4,
    };
    const s = new Shell(config);
    for (let i = 0; i < 2000; i++) s.write(w(((i * 7) % 1000) * 4 * KiB));
    assert.equal(s.count('complete'), 2000);
    const folded = s.count('persistBitmap') > 1 && s.count('freeLog') > 1;
    assert.ok(folded, 'the log was folded into the bitmap');
    assert.equal(s.engine.indicator.count, 1000, 'every written region is still dirty (no peer)');
  });

  it('backpressure: new writes wait while the in-flight window is full', () => {
    const s = new Shell({ ...base, inflightBytesMax: 64 * KiB });
    s.engine.handleConnected(0, 0);
    for (let i = 0; i < 8; i++) s.write(w(i * 64 * KiB, 16 * KiB));
    assert.equal(s.count('writeVolume'), 4);
    assert.equal(s.engine.stats().queuedTransactions, 4);
    s.ackAll();
    assert.equal(s.count('writeVolume'), 8);
  });

  it('§7: the resync-end mark covers every write submitted before the connection, admitted or not', () => {
    // Writes made apart that wait for the window when the link comes up: the replica is not a
    // state this side had until it holds them too (failover simulator, seed 5474).
    const s = new Shell({ ...base, inflightBytesMax: 64 * KiB });
    s.auto.volume = false;
    for (let i = 0; i < 8; i++) s.write(w(i * 64 * KiB, 16 * KiB));
    assert.equal(s.engine.stats().queuedTransactions, 4);
    s.engine.handleConnected(0, 0);
    s.run();
    for (let id = 1; id <= 8; id++) {
      assert.equal(s.count('sendBarrier'), 0, `no resync end before update ${id} is issued`);
      s.engine.handleVolumeWritten(id, 0);
      s.run();
      s.ackAll();
    }
    assert.deepEqual(
      s.all.filter((a) => a.type === 'sendBarrier').map((a) => [a.kind, a.afterUpdateId]),
      [['resyncEnd', 8]],
    );
  });

  it('ack timeout: persists the bitmap and asks for a disconnect', () => {
    const s = new Shell(base);
    s.engine.handleConnected(0, 0);
    s.write(w(0));
    const persists = s.count('persistBitmap');
    s.now = 4999;
    s.engine.handleTick(s.now);
    s.run();
    assert.equal(s.count('disconnect'), 0);
    s.now = 5000;
    s.engine.handleTick(s.now);
    s.run();
    assert.equal(s.count('disconnect'), 1);
    assert.ok(s.count('persistBitmap') > persists);
    assert.ok(!s.engine.isConnected());
    assert.ok(s.engine.indicator.test(0));
  });

  it('H13: a barrier goes on the stream after every update issued before it', () => {
    const s = new Shell(base);
    s.auto.volume = false;
    s.engine.handleConnected(0, 0);
    s.write(w(0));
    s.engine.submitFlush(0);
    s.run();
    assert.equal(s.count('sendBarrier'), 0);
    s.engine.handleVolumeWritten(1, 0);
    s.run();
    const types = s.all.map((a) => a.type);
    assert.ok(types.lastIndexOf('send') < types.indexOf('sendBarrier'));
  });

  it('H15: a clean region leaves the window only after a volume sync that followed its write', () => {
    const s = new Shell({ ...base, volumeWritesDurable: false, activityWindowRegions: 1 });
    s.engine.handleConnected(0, 0);
    s.run();
    s.auto.volumeSync = false;
    s.write(w(0));
    s.ackAll();
    s.write(w(64 * KiB)); // region 1: the window of one region is over size
    s.ackAll();
    assert.equal(s.engine.indicator.count, 0, 'both regions are clean (acked)');
    assert.ok(s.engine.isCovered(0), 'region 0 stays covered while its write may be only in the page cache');
    const sync = s.last('syncVolume');
    assert.ok(sync, 'the over-full window asks for a volume sync');
    s.engine.handleVolumeSynced(sync.syncId, 0);
    s.run();
    assert.ok(!s.engine.isCovered(0), 'once the sync is done, region 0 leaves the window');
    assert.ok(s.engine.isCovered(1), 'and the window keeps the most recent region');
  });

  it('H16: a FUA write is a barrier right after it on the stream and completes once durable', () => {
    const s = new Shell({ ...base, volumeWritesDurable: false });
    s.engine.handleConnected(0, 0);
    s.run();
    s.auto.volumeSync = false;
    const fua = s.engine.submitTransaction([w(0)], 0, { fua: true });
    s.run();
    const completed = () =>
      s.all.filter((a) => a.type === 'complete').map((a) => (a.type === 'complete' ? a.txId : 0));
    assert.ok(!completed().includes(fua), 'not complete before the volume sync');
    s.write(w(128 * KiB)); // issued while the FUA write waits for its sync
    const stream = s.all
      .filter((a) => a.type === 'send' || a.type === 'sendBarrier')
      .map((a) => (a.type === 'send' ? `u${a.updateId}` : `barrier after u${a.afterUpdateId}`));
    assert.deepEqual(
      stream,
      ['u1', 'barrier after u1', 'u2'],
      'the barrier separates the FUA write from what follows',
    );
    const sync = s.last('syncVolume');
    assert.ok(sync);
    s.engine.handleVolumeSynced(sync.syncId, 0);
    s.run();
    assert.ok(completed().includes(fua), 'complete once its write is durable');
  });

  it('FLUSH: completes after a volume sync issued after it, and is a barrier on the stream', () => {
    const s = new Shell({ ...base, volumeWritesDurable: false });
    s.engine.handleConnected(0, 0);
    s.run();
    s.auto.volumeSync = false;
    s.write(w(0));
    const flush = s.engine.submitFlush(0);
    s.run();
    assert.equal(s.count('flushed'), 0);
    assert.equal(s.last('sendBarrier')?.afterUpdateId, 1);
    const sync = s.last('syncVolume');
    assert.ok(sync);
    s.engine.handleVolumeSynced(sync.syncId, 0);
    s.run();
    assert.equal(s.last('flushed')?.flushId, flush);
    // Nothing written since: the next FLUSH needs no sync at all.
    const again = s.engine.submitFlush(0);
    s.run();
    assert.equal(s.last('flushed')?.flushId, again);
  });

  it('H17: no region is read for a resync before the first volume sync after start', () => {
    const dirty = new IndicatorMap(64);
    dirty.set(3);
    const config = { ...base, volumeWritesDurable: false };
    const engine = new Engine(config, { dirty: dirty.snapshot(), idLimit: 10, logTailLsn: 0, logHeadLsn: 0 });
    const first = engine.pollActions();
    const sync = first.find((a) => a.type === 'syncVolume');
    const persist = first.find((a) => a.type === 'persistBitmap');
    assert.ok(
      sync?.type === 'syncVolume' && persist?.type === 'persistBitmap',
      'a recovered engine syncs the volume first',
    );
    engine.handleBitmapPersisted(persist.checkpointId, 0);
    engine.handleConnected(0, 0);
    const reads = () => engine.pollActions().filter((a) => a.type === 'readRegion');
    assert.equal(reads().length, 0, 'a dead process may have left unsynced writes: nothing is read yet');
    engine.handleVolumeSynced(sync.syncId, 0);
    assert.equal(reads().length, 1, 'after the sync the resync reads the region');
  });

  it('a checkpoint does not forget clean regions waiting for their volume sync (no needless resync)', () => {
    const s = new Shell({ ...base, volumeWritesDurable: false, activityWindowRegions: 64 });
    s.engine.handleConnected(0, 0);
    s.run();
    s.auto.volumeSync = false;
    s.write(w(0));
    s.ackAll();
    s.engine.requestCheckpoint(0);
    s.run();
    const dirtyIn = (a: ReturnType<Shell['last']>) =>
      a?.type === 'persistBitmap' && IndicatorMap.fromBytes(64, s.bitmaps.get(a.checkpointId)!).test(0);
    assert.ok(
      dirtyIn(s.last('persistBitmap')),
      'its write may be only in the page cache: dirty for the bitmap',
    );
    // The sync it waits for still comes, within the interval, and the next bitmap has it clean.
    assert.ok(s.engine.nextDeadline() <= 1000, `deadline ${s.engine.nextDeadline()}`);
    s.now = 1000;
    s.engine.handleTick(s.now);
    s.run();
    const sync = s.last('syncVolume');
    assert.ok(sync && sync.syncId > 1, 'a volume sync is asked for');
    s.engine.handleVolumeSynced(sync.syncId, s.now);
    s.engine.requestCheckpoint(s.now);
    s.run();
    assert.ok(!dirtyIn(s.last('persistBitmap')), 'the next bitmap has the region clean');
  });

  it('recovery: the first action persists the recovered bitmap; a connect resyncs it', () => {
    const dirty = new IndicatorMap(64);
    dirty.set(5);
    dirty.set(63);
    const engine = new Engine(base, {
      dirty: dirty.snapshot(),
      idLimit: 1000,
      logTailLsn: 4096,
      logHeadLsn: 8192,
    });
    const first = engine.pollAction();
    assert.ok(first?.type === 'persistBitmap' && first.coveredLsn === 8192);
    const s = new Shell(base, engine);
    s.engine.handleConnected(999, 0);
    s.run();
    assert.deepEqual(
      s.sent.map((a) => [a.updateId, a.offset / (64 * KiB)]),
      [
        [1000, 5],
        [1001, 63],
      ],
    );
    s.ackAll();
    assert.equal(s.engine.indicator.count, 0);
  });

  it('refuses bad input with stable codes (I7)', () => {
    assert.throws(() => new Engine({ ...base, regionSize: 1000 }), { code: 'VOLREP_ERR_CONFIG' });
    assert.throws(() => new Engine({ ...base, logCapacity: 100 }), { code: 'VOLREP_ERR_CONFIG' });
    const s = new Shell(base);
    assert.throws(() => s.engine.submitTransaction([w(base.volumeSize - 1, 2)], 0), {
      code: 'VOLREP_ERR_REQUEST',
    });
    assert.throws(() => s.engine.submitTransaction([], 0), { code: 'VOLREP_ERR_REQUEST' });
    assert.throws(() => s.engine.handleConnected(5, 0), { code: 'VOLREP_ERR_PROTOCOL' });
    s.engine.handleConnected(0, 0);
    assert.throws(() => s.engine.handleAck(1, 0), { code: 'VOLREP_ERR_PROTOCOL' });
    assert.throws(() => s.engine.handleLogSynced(8, 0), { code: 'VOLREP_ERR_STATE' });
    assert.throws(() => s.engine.handleVolumeWritten(77, 0), { code: 'VOLREP_ERR_STATE' });
    assert.throws(() => s.engine.handleBitmapPersisted(9, 0), { code: 'VOLREP_ERR_STATE' });
  });

  it('a checkpoint with hundreds of thousands of regions awaiting a volume sync (no stack overflow)', () => {
    // Written, never flushed, standalone, while the volume sync that the engine asks for after
    // 64 Ki regions takes its time: the regions not known durable pile up.
    const regions = 320 * 1024;
    const s = new Shell({
      ...base,
      volumeSize: regions * 4 * KiB,
      regionSize: 4 * KiB,
      logCapacity: 1024 * KiB,
      activityWindowRegions: 1024,
      inflightBytesMax: 64 * 1024 * KiB,
      volumeWritesDurable: false,
    });
    s.auto.volumeSync = false;
    for (let at = 0; at < regions * 4 * KiB; at += 8 * 1024 * KiB) s.write(w(at, 8 * 1024 * KiB));
    s.engine.requestCheckpoint(s.now);
    s.run();
    const persisted = s.bitmaps.get(s.last('persistBitmap')!.checkpointId)!;
    assert.ok(
      persisted.every((b) => b === 0xff),
      'every written region is dirty in the bitmap',
    );
  });

  it('16 TiB volume, 64 KiB regions: per-write work does not grow with the volume', () => {
    const big: EngineConfig = { ...base, volumeSize: 16 * 1024 ** 4, logCapacity: 8 * 1024 * KiB };
    const s = new Shell(big);
    s.engine.handleConnected(0, 0);
    s.run();
    const t0 = performance.now();
    let x = 7;
    for (let i = 0; i < 20_000; i++) {
      x = (x * 1103515245 + 12345) % 2 ** 31;
      s.write(w(x * 8192, 4096));
      if (i % 64 === 63) s.ackAll();
    }
    s.ackAll();
    const ms = performance.now() - t0;
    assert.equal(s.engine.indicator.count, 0);
    assert.ok(ms < 5000, `20k writes took ${ms.toFixed(0)} ms`);
  });
});
