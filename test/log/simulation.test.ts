/**
 * Seeded deterministic simulation: the engine core with the real log file and bitmap file over
 * simulated disks that lose and tear unsynced writes on power loss, a volume and a replica as
 * real bytes, a wire that a disconnect empties, and crashes of the primary at random moments.
 *
 * At every step it simulates a power loss on copies of the disks and runs the real recovery:
 * every region whose bytes differ between volume and replica (or may, with what is on the wire
 * or in flight to the volume) must be dirty (I1). On the chosen crashes, the primary restarts
 * from what recovery found. At the end the link comes back, everything drains, and volume and
 * replica must be byte-for-byte identical.
 *
 * VOLREP_SEED=<n> replays one seed; VOLREP_SIM_SEEDS=<n> runs more seeds.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { type Action, Engine, type EngineConfig } from '../../src/core/engine.js';
import { IndicatorMap } from '../../src/core/indicator-map.js';
import { BitmapFile } from '../../src/log/bitmap-file.js';
import { type LogBatch, LogFile } from '../../src/log/log-file.js';
import { recover } from '../../src/log/recovery.js';
import { Prng } from '../sim/prng.js';
import { SimDisk } from '../sim/sim-disk.js';

const STEPS = 400;
const SEEDS = process.env.VOLREP_SIM_SEEDS ? Number(process.env.VOLREP_SIM_SEEDS) : 40;
const QUIESCE_STEPS_MAX = 20_000;

const baseConfig: EngineConfig = {
  volumeSize: 12 * 4096 + 1000, // a partial last region
  regionSize: 4096,
  logCapacity: 2048,
  activityWindowRegions: 6,
  inflightBytesMax: 24 * 1024,
  ackTimeoutMs: 500,
  txWritesMax: 3,
};

interface Msg {
  updateId: number;
  offset: number;
  data: Uint8Array;
}

/** Seeds cycle through window sizes: evicting constantly, some, or never (whole volume hot). */
const WINDOWS = [2, 6, 16];
let config = baseConfig;

class Sim {
  readonly prng: Prng;
  readonly regionCount: number;
  logDisk = new SimDisk(LogFile.fileBytes(config.logCapacity));
  bmDisk: SimDisk;
  engine!: Engine;
  log!: LogFile;
  bitmap!: BitmapFile;
  now = 0;
  volume = new Uint8Array(config.volumeSize);
  /** The volume as a power loss leaves it at least (after the last volume sync). */
  volumeDurable = new Uint8Array(config.volumeSize);
  volTouched = new Set<number>();
  volSync: { syncId: number; image: Uint8Array; touched: Set<number> } | null = null;
  replica = new Uint8Array(config.volumeSize);
  lastApplied = 0;
  ackable = 0;
  connected = false;
  wire: Msg[] = [];
  txData = new Map<number, Uint8Array[]>();
  readData = new Map<number, Uint8Array>();
  volumeWrites = new Map<number, Extract<Action, { type: 'writeVolume' }>>();
  reads = new Map<number, Extract<Action, { type: 'readRegion' }>>();
  logBatch: { batch: LogBatch; throughLsn: number } | null = null;
  bitmapJob: { action: Extract<Action, { type: 'persistBitmap' }>; written: boolean } | null = null;
  crashes = 0;
  checkpoints = 0;
  /** How often each action came up (to see that a schedule reaches the interesting places). */
  readonly counts: Record<string, number> = {};
  trace: string[] = [];

  constructor(seed: number) {
    this.prng = new Prng(seed);
    this.regionCount = Math.ceil(config.volumeSize / config.regionSize);
    this.bmDisk = new SimDisk(BitmapFile.fileBytes(this.regionCount));
  }

  async start(): Promise<void> {
    await LogFile.format(this.logDisk);
    await BitmapFile.format(this.bmDisk, this.regionCount);
    await this.restart();
  }

  /** Recovery from the disks, as the daemon does at start. */
  async restart(): Promise<void> {
    const r = await recover(this.logDisk, this.bmDisk, this.regionCount);
    if (process.env.VOLREP_SIM_DEBUG)
      this.trace.push(
        `recovered ${JSON.stringify({ ...r.report, tail: r.state.logTailLsn, head: r.state.logHeadLsn })} slots ${slotInfo(this.bmDisk, this.regionCount)}`,
      );
    this.log = r.log;
    this.bitmap = r.bitmap;
    assert.ok(
      r.state.idLimit > this.lastApplied,
      'H14: ids after recovery are above every id the replica has',
    );
    this.engine = new Engine(config, r.state);
    this.logBatch = null;
    this.bitmapJob = null;
    await this.drain();
  }

  async step(): Promise<void> {
    const p = this.prng;
    const choice = p.int(100);
    if (choice < 14) await this.submit();
    else if (choice < 24) await this.writeLogBatch();
    else if (choice < 36) await this.finishVolumeWrite(p.int(1000));
    else if (choice < 41) await this.finishRead(p.int(1000));
    else if (choice < 55) this.apply();
    else if (choice < 65) await this.ack();
    else if (choice < 68)
      await (this.connected ? (p.chance(0.3) ? this.disconnect() : this.ack()) : this.connect());
    else if (choice < 76) await this.bitmapStep();
    else if (choice < 82) await this.tick(p.chance(0.1) ? p.int(2000) : p.int(100));
    else if (choice < 85) {
      this.engine.requestCheckpoint(this.now);
      await this.drain();
    } else if (choice < 86) await this.crash();
    else if (choice < 91) await this.syncVolume();
    else {
      this.apply();
      await this.ack();
    }
  }

  async submit(): Promise<void> {
    const p = this.prng;
    const n = 1 + p.int(config.txWritesMax ?? 1);
    const writes = [];
    const data: Uint8Array[] = [];
    for (let i = 0; i < n; i++) {
      const offset = p.int(config.volumeSize);
      const span = p.chance(0.2) ? 2 * config.regionSize : 512;
      const length = 1 + p.int(Math.min(config.volumeSize - offset, span));
      const kind = p.pick(['data', 'data', 'data', 'zero', 'trim'] as const);
      const buf = new Uint8Array(length);
      if (kind === 'data') p.fill(buf);
      writes.push({ offset, length, kind });
      data.push(buf);
    }
    const txId = this.engine.submitTransaction(writes, this.now);
    this.txData.set(txId, data);
    this.trace.push(`submit tx${txId}`);
    await this.drain();
  }

  /** Group commit in two halves, so a crash can fall between the write and the sync. */
  async writeLogBatch(): Promise<void> {
    const b = this.logBatch;
    if (b === null) return;
    await this.log.syncBatch(b.batch);
    this.logBatch = null;
    this.trace.push(`logSynced ${b.throughLsn}`);
    this.engine.handleLogSynced(b.throughLsn, this.now);
    await this.drain();
  }

  async finishVolumeWrite(pick: number): Promise<void> {
    if (this.volumeWrites.size === 0) return;
    const a = [...this.volumeWrites.values()][pick % this.volumeWrites.size];
    this.volumeWrites.delete(a.updateId);
    this.volume.set(this.txData.get(a.txId)![a.index], a.offset);
    for (let reg = regionOf(a.offset); reg <= regionOf(a.offset + a.length - 1); reg++)
      this.volTouched.add(reg);
    this.trace.push(`volumeWritten u${a.updateId}`);
    this.engine.handleVolumeWritten(a.updateId, this.now);
    await this.drain();
  }

  async syncVolume(): Promise<void> {
    const v = this.volSync;
    if (v === null) return;
    this.volSync = null;
    this.volumeDurable = v.image as Uint8Array<ArrayBuffer>;
    this.trace.push(`volumeSynced ${v.syncId}`);
    this.engine.handleVolumeSynced(v.syncId, this.now);
    await this.drain();
  }

  async finishRead(pick: number): Promise<void> {
    if (this.reads.size === 0) return;
    const a = [...this.reads.values()][pick % this.reads.size];
    this.reads.delete(a.updateId);
    this.readData.set(a.updateId, this.volume.slice(a.offset, a.offset + a.length));
    this.trace.push(`resyncRead u${a.updateId}`);
    this.engine.handleResyncRead(a.updateId, this.now);
    await this.drain();
  }

  apply(): void {
    const m = this.wire.shift();
    if (m === undefined) return;
    assert.ok(m.updateId > this.lastApplied, 'the replica applies increasing ids');
    this.replica.set(m.data, m.offset);
    this.lastApplied = m.updateId;
    this.ackable = m.updateId;
    this.trace.push(`apply u${m.updateId}`);
  }

  async ack(): Promise<void> {
    if (!this.connected || this.ackable === 0) return;
    const n = this.ackable;
    this.ackable = 0;
    this.trace.push(`ack ${n}`);
    this.engine.handleAck(n, this.now);
    await this.drain();
  }

  async disconnect(): Promise<void> {
    this.connected = false;
    this.wire = [];
    this.ackable = 0;
    this.trace.push('disconnected');
    this.engine.handleDisconnected(this.now);
    await this.drain();
  }

  async connect(): Promise<void> {
    this.connected = true;
    this.trace.push(`connected ${this.lastApplied}`);
    this.engine.handleConnected(this.lastApplied, this.now);
    await this.drain();
  }

  async bitmapStep(): Promise<void> {
    const job = this.bitmapJob;
    if (job === null) return;
    const a = job.action;
    if (!job.written) {
      await this.bitmap.writeSlot(a.bitmap, a.coveredLsn, a.idLimit);
      job.written = true;
      return;
    }
    await this.bitmap.sync();
    this.bitmapJob = null;
    this.checkpoints += 1;
    this.trace.push(`bitmapPersisted cp${a.checkpointId}`);
    this.engine.handleBitmapPersisted(a.checkpointId, this.now);
    await this.drain();
  }

  async tick(ms: number): Promise<void> {
    this.now += ms;
    this.engine.handleTick(this.now);
    await this.drain();
  }

  /** Power loss on the primary, then a restart from what recovery finds on the disks. */
  async crash(): Promise<void> {
    this.crashes += 1;
    this.trace.push('CRASH');
    this.logDisk.crash(this.prng);
    this.bmDisk.crash(this.prng);
    this.landVolumeWrites(this.volume, this.prng);
    // Writes not known durable may be lost, 512 bytes at a time.
    for (let at = 0; at < config.volumeSize; at += 512) {
      const end = Math.min(at + 512, config.volumeSize);
      if (this.prng.chance(0.5)) this.volume.set(this.volumeDurable.subarray(at, end), at);
    }
    this.volumeDurable = this.volume.slice();
    this.volTouched.clear();
    this.volSync = null;
    this.connected = false;
    this.wire = [];
    this.ackable = 0;
    this.volumeWrites.clear();
    this.reads.clear();
    this.readData.clear();
    this.txData.clear();
    const r = await recover(this.logDisk, this.bmDisk, this.regionCount);
    this.checkDirty(IndicatorMap.fromBytes(this.regionCount, r.state.dirty), [this.replica], 'after crash');
    await this.restart();
  }

  /** Each in-flight volume write lands whole, not at all, or as a prefix. */
  landVolumeWrites(volume: Uint8Array, p: Prng): void {
    for (const a of this.volumeWrites.values()) {
      const data = this.txData.get(a.txId)![a.index];
      const mode = p.int(3);
      if (mode === 0) volume.set(data, a.offset);
      else if (mode === 1) volume.set(data.subarray(0, p.int(data.length + 1)), a.offset);
    }
  }

  /** I1 with real bytes: a power loss now (on copies of the disks) loses no location. */
  async checkI1(): Promise<void> {
    const fork = new Prng(this.prng.next());
    const logCopy = cloneDisk(this.logDisk);
    const bmCopy = cloneDisk(this.bmDisk);
    logCopy.crash(fork);
    bmCopy.crash(fork);
    const r = await recover(logCopy, bmCopy, this.regionCount);
    if (process.env.VOLREP_SIM_DEBUG) {
      const { scan } = await LogFile.open(logCopy);
      const { bitmap } = await BitmapFile.open(bmCopy, this.regionCount);
      console.error(
        slotInfo(bmCopy, this.regionCount),
        'orig',
        slotInfo(this.bmDisk, this.regionCount),
        JSON.stringify({
          report: r.report,
          covered: bitmap.coveredLsn,
          bits: setBits(this.regionCount, bitmap.bits),
          tail: scan.tailLsn,
          head: scan.headLsn,
          recs: scan.records.map((x) => [
            x.type,
            x.lsn,
            x.type === 'begin' ? x.ranges : x.type === 'complete' ? x.begins : '',
          ]),
        }),
      );
    }
    const dirty = IndicatorMap.fromBytes(this.regionCount, r.state.dirty);
    assert.ok(r.state.idLimit > this.lastApplied, 'H14: a recovery now would not reuse an applied id');
    // Every replica image the wire can still produce; the volume with in-flight writes landed or not.
    const replicas = [this.replica.slice()];
    for (const m of this.wire) {
      const next = replicas[replicas.length - 1].slice();
      next.set(m.data, m.offset);
      replicas.push(next);
    }
    this.checkDirty(dirty, replicas, 'power loss now');
    for (const a of this.volumeWrites.values()) {
      for (let reg = regionOf(a.offset); reg <= regionOf(a.offset + a.length - 1); reg++) {
        assert.ok(
          dirty.test(reg),
          `I1: region ${reg} has a volume write in flight but recovery would not mark it`,
        );
      }
    }
    for (const reg of [...this.volTouched, ...(this.volSync?.touched ?? [])]) {
      assert.ok(
        dirty.test(reg),
        `I1: region ${reg} has a volume write not yet durable but recovery would not mark it`,
      );
    }
  }

  checkDirty(dirty: IndicatorMap, replicas: Uint8Array[], when: string): void {
    for (let reg = 0; reg < this.regionCount; reg++) {
      if (dirty.test(reg)) continue;
      const start = reg * config.regionSize;
      const end = Math.min(start + config.regionSize, config.volumeSize);
      for (const rep of replicas) {
        if (Buffer.compare(this.volume.subarray(start, end), rep.subarray(start, end)) !== 0) {
          assert.fail(
            `I1 (${when}): region ${reg} differs from the replica but recovery does not mark it ` +
              `(recovered dirty [${[...dirty.iterate()]}], engine: dirty ${this.engine.indicator.test(reg)}, ` +
              `pending ${this.engine.pendingCount(reg)}, covered ${this.engine.isCovered(reg)}; ` +
              `${JSON.stringify(this.engine.stats())})`,
          );
        }
      }
    }
  }

  async drain(): Promise<void> {
    for (let a = this.engine.pollAction(); a !== undefined; a = this.engine.pollAction())
      await this.perform(a);
  }

  async perform(a: Action): Promise<void> {
    this.counts[a.type] = (this.counts[a.type] ?? 0) + 1;
    switch (a.type) {
      case 'appendLog':
        this.log.append(a.record);
        break;
      case 'syncLog': {
        assert.equal(this.logBatch, null);
        const batch = await this.log.writeBatch();
        assert.equal(batch.throughLsn, a.throughLsn, 'the batch holds exactly the appended records');
        this.logBatch = { batch, throughLsn: a.throughLsn };
        break;
      }
      case 'freeLog':
        this.log.setTail(a.upToLsn, a.idLimit);
        break;
      case 'writeVolume':
        this.volumeWrites.set(a.updateId, a);
        break;
      case 'readRegion':
        this.reads.set(a.updateId, a);
        break;
      case 'send': {
        assert.ok(this.connected);
        const data =
          a.source.type === 'resync'
            ? this.readData.get(a.updateId)!
            : this.txData.get(a.source.txId)![a.source.index];
        assert.ok(data !== undefined && data.length === a.length);
        this.readData.delete(a.updateId);
        this.wire.push({ updateId: a.updateId, offset: a.offset, data });
        break;
      }
      case 'dropUpdate':
        this.readData.delete(a.updateId);
        break;
      case 'complete':
        break;
      case 'persistBitmap':
        if (process.env.VOLREP_SIM_DEBUG)
          this.trace.push(
            `persistBitmap cp${a.checkpointId} covered ${a.coveredLsn} bits [${setBits(this.regionCount, a.bitmap)}]`,
          );
        assert.equal(this.bitmapJob, null);
        this.bitmapJob = { action: a, written: false };
        break;
      case 'disconnect':
        if (this.connected) await this.disconnect();
        break;
      case 'syncVolume':
        assert.equal(this.volSync, null);
        this.volSync = { syncId: a.syncId, image: this.volume.slice(), touched: this.volTouched };
        this.volTouched = new Set();
        break;
      case 'sendBarrier':
        assert.ok(this.connected);
        break;
    }
  }

  /** The link comes back and everything drains: volume and replica must end identical. */
  async quiesce(): Promise<void> {
    if (!this.connected) await this.connect();
    for (let i = 0; i < QUIESCE_STEPS_MAX; i++) {
      if (this.logBatch) await this.writeLogBatch();
      else if (this.volSync) await this.syncVolume();
      else if (this.volumeWrites.size > 0) await this.finishVolumeWrite(0);
      else if (this.reads.size > 0) await this.finishRead(0);
      else if (this.bitmapJob) await this.bitmapStep();
      else if (this.wire.length > 0) this.apply();
      else if (this.ackable > 0) await this.ack();
      else break;
    }
    const s = this.engine.stats();
    assert.equal(
      s.queuedTransactions + s.inflightBytes + s.dirtyRegions,
      0,
      `liveness: ${JSON.stringify(s)}`,
    );
    assert.ok(Buffer.compare(this.volume, this.replica) === 0, 'volume and replica identical after draining');
  }
}

function slotInfo(d: SimDisk, regionCount: number): string {
  const out: string[] = [];
  for (let i = 0; i < 2; i++) {
    const h = d.readSync(i * BitmapFile.slotBytes(regionCount), 64);
    const v = new DataView(h.buffer);
    out.push(`slot${i}: seq ${v.getBigUint64(16, true)} covered ${v.getBigUint64(32, true)}`);
  }
  return out.join(', ');
}

function setBits(regionCount: number, bytes: Uint8Array): number[] {
  return [...IndicatorMap.fromBytes(regionCount, bytes).iterate()];
}

function regionOf(offset: number): number {
  return Math.floor(offset / config.regionSize);
}

function cloneDisk(d: SimDisk): SimDisk {
  // A copy that shares nothing: crash() on it must not touch the original.
  const copy = Object.create(SimDisk.prototype) as SimDisk;
  Object.assign(copy, structuredClone({ ...d }));
  return copy;
}

async function runSeed(seed: number): Promise<Sim> {
  config = { ...baseConfig, activityWindowRegions: WINDOWS[seed % WINDOWS.length] };
  const sim = new Sim(seed);
  try {
    await sim.start();
    for (let i = 0; i < STEPS; i++) {
      await sim.step();
      await sim.checkI1();
    }
    await sim.quiesce();
    return sim;
  } catch (err) {
    console.error(`simulation failed: seed ${seed} (replay with VOLREP_SEED=${seed})`);
    console.error(`last events:\n  ${sim.trace.slice(-80).join('\n  ')}`);
    throw err;
  }
}

describe('deterministic simulation: engine + log + bitmap over disks that lose power', () => {
  it(`never loses a location across crashes (${SEEDS} seeds x ${STEPS} steps)`, async (t) => {
    const seeds = process.env.VOLREP_SEED
      ? [Number(process.env.VOLREP_SEED)]
      : Array.from({ length: SEEDS }, (_, i) => i + 1);
    let crashes = 0;
    let checkpoints = 0;
    const counts: Record<string, number> = {};
    for (const seed of seeds) {
      const sim = await runSeed(seed);
      crashes += sim.crashes;
      checkpoints += sim.checkpoints;
      for (const [k, v] of Object.entries(sim.counts)) counts[k] = (counts[k] ?? 0) + v;
    }
    t.diagnostic(`crashes ${crashes}, checkpoints ${checkpoints}, actions ${JSON.stringify(counts)}`);
    // The schedule must reach the interesting places, or the test proves little.
    assert.ok(crashes >= seeds.length, `only ${crashes} crashes`);
    assert.ok(checkpoints >= seeds.length, `only ${checkpoints} checkpoints`);
  });
});
