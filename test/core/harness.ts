/**
 * A reference world around the engine core for property tests (the shape of
 * shared/model/core_model.py): a volume and a replica as per-sector content ids, the log as
 * the list of records the engine appended (durable up to the last sync; any longer prefix may
 * survive a power loss), the persisted bitmap, the wire, and the secondary's acks. After every
 * step it checks I1, I2, I3 and H10/H14 against this world, not against the engine's own state.
 */
import assert from 'node:assert/strict';
import {
  type Action,
  Engine,
  type EngineConfig,
  type RecoveredState,
  type WriteKind,
} from '../../src/core/engine.js';
import { IndicatorMap } from '../../src/core/indicator-map.js';
import type { LogRecord } from '../../src/core/records.js';
import { recordBytes } from '../../src/core/records.js';

export const SECTOR_BYTES = 512;
/** Steps allowed to reach quiescence; more means the engine is stuck (a liveness bug). */
const QUIESCE_STEPS_MAX = 5000;

interface Msg {
  updateId: number;
  /** [sector index, content id] pairs the update sets on the replica. */
  sectors: Array<[number, number]>;
}

interface Bitmap {
  bits: Set<number>;
  coveredLsn: number;
  idLimit: number;
}

interface TxWrite {
  offset: number;
  length: number;
  kind: WriteKind;
  done: boolean;
}

export interface CrashChoice {
  /** Index into the possible durable log prefixes (mod their count). */
  prefix: number;
  /** Whether a bitmap persist in flight made it to disk. */
  bitmapLanded: boolean;
  /** Bit i: whether the i-th in-flight volume write landed. */
  writesLanded: number;
}

export class World {
  engine: Engine;
  readonly config: EngineConfig;
  readonly regionCount: number;
  readonly sectorsPerRegion: number;
  now = 0;

  vol: Int32Array;
  rep: Int32Array;
  /** What a power loss cannot take back from the volume (after the last volume sync). */
  private volDurable: Int32Array;
  /** Regions with volume writes finished since the last volume sync was issued / in that sync. */
  private volTouched = new Set<number>();
  private volSync: { syncId: number; image: Int32Array; touched: Set<number> } | null = null;
  private repLastApplied = 0;
  private wire: Msg[] = [];
  private ackable: number[] = [];
  connected = false;

  // The log as the engine asked for it.
  private records: Array<{ record: LogRecord; end: number }> = [];
  private logHead: number;
  private logDurable: number;
  private logFreed: number;
  private headerIdLimit = 1;
  private syncPending: number | null = null;

  private bitmap: Bitmap;
  private bitmapPending: (Bitmap & { checkpointId: number }) | null = null;

  private inflightWrites = new Map<number, Extract<Action, { type: 'writeVolume' }>>();
  private pendingReads = new Map<number, Extract<Action, { type: 'readRegion' }>>();
  private readData = new Map<number, Array<[number, number]>>();
  private txs = new Map<number, TxWrite[]>();
  /** Updates with an id the world has seen and not yet seen acked, dropped or lost. */
  private liveUpdates = new Map<number, { first: number; last: number }>();
  private lastSentId = 0;
  /** Highest id sent or dropped; the engine releases ids in order. */
  private lastReleasedId = 0;
  /** Highest id that ever left the primary (H14: may never be issued again). */
  private maxIdSent = 0;
  private contentId = 1_000_000;
  readonly log: string[] = [];

  constructor(config: EngineConfig) {
    this.config = config;
    this.engine = new Engine(config);
    this.regionCount = this.engine.regionCount;
    this.sectorsPerRegion = config.regionSize / SECTOR_BYTES;
    this.vol = new Int32Array(config.volumeSize / SECTOR_BYTES);
    this.rep = new Int32Array(config.volumeSize / SECTOR_BYTES);
    this.volDurable = new Int32Array(config.volumeSize / SECTOR_BYTES);
    this.logHead = 0;
    this.logDurable = 0;
    this.logFreed = 0;
    this.bitmap = { bits: new Set(), coveredLsn: 0, idLimit: 1 };
  }

  // ---------------------------------------------------------------------------------------------
  // Steps (each returns false when not enabled).

  submit(writes: Array<{ sector: number; sectors: number; kind: WriteKind }>): boolean {
    const total = this.vol.length;
    const reqs = writes.map((w) => {
      const start = w.sector % total;
      const n = Math.max(1, Math.min(w.sectors, total - start));
      return { offset: start * SECTOR_BYTES, length: n * SECTOR_BYTES, kind: w.kind };
    });
    const txId = this.engine.submitTransaction(reqs, this.now);
    this.txs.set(
      txId,
      reqs.map((r) => ({ ...r, done: false })),
    );
    this.log.push(`submit tx${txId} ${reqs.map((r) => `${r.kind}@${r.offset}+${r.length}`).join(',')}`);
    this.drain();
    return true;
  }

  syncLog(): boolean {
    if (this.syncPending === null) return false;
    const through = this.syncPending;
    this.syncPending = null;
    this.logDurable = Math.max(this.logDurable, through);
    this.log.push(`logSynced ${through}`);
    this.engine.handleLogSynced(through, this.now);
    this.drain();
    return true;
  }

  finishWrite(pick: number): boolean {
    if (this.inflightWrites.size === 0) return false;
    const a = [...this.inflightWrites.values()][pick % this.inflightWrites.size];
    this.inflightWrites.delete(a.updateId);
    this.applyWrite(a);
    this.txs.get(a.txId)![a.index].done = true;
    this.log.push(`volumeWritten u${a.updateId}`);
    this.engine.handleVolumeWritten(a.updateId, this.now);
    this.drain();
    return true;
  }

  syncVolume(): boolean {
    const v = this.volSync;
    if (v === null) return false;
    this.volSync = null;
    // Everything written before the sync was issued is durable now.
    for (let i = 0; i < v.image.length; i++)
      if (v.image[i] !== this.volDurable[i]) this.volDurable[i] = v.image[i];
    this.log.push(`volumeSynced ${v.syncId}`);
    this.engine.handleVolumeSynced(v.syncId, this.now);
    this.drain();
    return true;
  }

  barrier(): boolean {
    this.engine.submitFlush(this.now);
    this.drain();
    return true;
  }

  finishRead(pick: number): boolean {
    if (this.pendingReads.size === 0) return false;
    const a = [...this.pendingReads.values()][pick % this.pendingReads.size];
    this.pendingReads.delete(a.updateId);
    const first = a.offset / SECTOR_BYTES;
    const sectors: Array<[number, number]> = [];
    for (let s = first; s < first + a.length / SECTOR_BYTES; s++) sectors.push([s, this.vol[s]]);
    this.readData.set(a.updateId, sectors);
    this.log.push(`resyncRead u${a.updateId}`);
    this.engine.handleResyncRead(a.updateId, this.now);
    this.drain();
    return true;
  }

  /** The secondary applies the next update durably. */
  apply(): boolean {
    const m = this.wire.shift();
    if (m === undefined) return false;
    for (const [s, c] of m.sectors) this.rep[s] = c;
    assert.ok(m.updateId > this.repLastApplied, 'H10: the replica sees increasing ids');
    this.repLastApplied = m.updateId;
    this.ackable.push(m.updateId);
    this.log.push(`apply u${m.updateId}`);
    return true;
  }

  /** The secondary acks everything it applied so far (one cumulative ack). */
  ack(): boolean {
    if (!this.connected || this.ackable.length === 0) return false;
    const n = this.ackable[this.ackable.length - 1];
    this.ackable = [];
    for (const id of [...this.liveUpdates.keys()]) if (id <= n) this.liveUpdates.delete(id);
    this.log.push(`ack ${n}`);
    this.engine.handleAck(n, this.now);
    this.drain();
    return true;
  }

  disconnect(): boolean {
    if (!this.connected) return false;
    this.cutLink();
    this.log.push('disconnected');
    this.engine.handleDisconnected(this.now);
    this.drain();
    return true;
  }

  connect(): boolean {
    if (this.connected) return false;
    this.connected = true;
    this.log.push(`connected ${this.repLastApplied}`);
    this.engine.handleConnected(this.repLastApplied, this.now);
    this.drain();
    return true;
  }

  persistBitmap(): boolean {
    const p = this.bitmapPending;
    if (p === null) return false;
    this.bitmapPending = null;
    this.bitmap = { bits: p.bits, coveredLsn: p.coveredLsn, idLimit: p.idLimit };
    this.log.push(`bitmapPersisted cp${p.checkpointId}`);
    this.engine.handleBitmapPersisted(p.checkpointId, this.now);
    this.drain();
    return true;
  }

  tick(ms: number): boolean {
    this.now += ms;
    this.engine.handleTick(this.now);
    this.drain();
    return true;
  }

  checkpoint(): boolean {
    this.engine.requestCheckpoint(this.now);
    this.drain();
    return true;
  }

  /**
   * Power loss on the primary: the durable log is one of the possible prefixes, a bitmap in
   * flight did or did not land, in-flight volume writes did or did not land. Recovery from that
   * state must mark every region that differs (I1), and ids must not repeat (H14).
   */
  crash(choice: CrashChoice): void {
    const prefixes = this.possiblePrefixes();
    const prefix = prefixes[choice.prefix % prefixes.length];
    const bitmap = this.bitmapPending && choice.bitmapLanded ? this.bitmapPending : this.bitmap;
    let i = 0;
    for (const a of this.inflightWrites.values()) {
      if ((choice.writesLanded >>> i) & 1) this.applyWrite(a);
      i += 1;
    }
    // Volume writes not known durable may be lost, sector by sector.
    for (let s = 0; s < this.vol.length; s++) {
      if (this.vol[s] !== this.volDurable[s] && ((choice.writesLanded >>> (s % 29)) & 2) === 0) {
        this.vol[s] = this.volDurable[s];
      }
    }
    this.volDurable = this.vol.slice();
    this.volTouched.clear();
    this.volSync = null;
    this.log.push(`CRASH prefix=${prefix} bitmapLanded=${bitmap !== this.bitmap}`);
    this.cutLink();
    this.inflightWrites.clear();
    this.pendingReads.clear();
    this.readData.clear();
    this.txs.clear();
    this.liveUpdates.clear();

    const dirty = this.recovered(prefix, bitmap);
    const must = this.mustBeDirty();
    for (const r of must)
      assert.ok(dirty.has(r), `I1 after crash: region ${r} differs but recovery does not mark it`);

    // What recovery hands the new engine (as src/log/recovery.ts does over real files).
    let idLimit = Math.max(bitmap.idLimit, this.headerIdLimit);
    for (const { record, end } of this.records) {
      if (end <= prefix && record.lsn >= this.logFreed) idLimit = Math.max(idLimit, record.idLimit);
    }
    assert.ok(
      idLimit > this.maxIdSent,
      `H14: recovered id limit ${idLimit} must exceed sent id ${this.maxIdSent}`,
    );
    let head = Math.max(prefix, this.logFreed);
    let tail = this.logFreed;
    if (head < bitmap.coveredLsn) {
      head = bitmap.coveredLsn;
      tail = head;
    }
    this.records = this.records.filter((r) => r.record.lsn >= tail && r.end <= head);
    this.logHead = head;
    this.logDurable = head;
    this.logFreed = tail;
    this.syncPending = null;
    this.bitmap = bitmap;
    this.bitmapPending = null;
    const map = new IndicatorMap(this.regionCount);
    for (const r of dirty) map.set(r);
    const state: RecoveredState = { dirty: map.snapshot(), idLimit, logTailLsn: tail, logHeadLsn: head };
    this.engine = new Engine(this.config, state);
    this.lastReleasedId = idLimit - 1;
    this.drain();
  }

  /** Runs everything to completion with the link up; then volume and replica must be equal. */
  quiesce(): void {
    if (!this.connected) this.connect();
    for (let i = 0; i < QUIESCE_STEPS_MAX; i++) {
      const progressed =
        this.syncLog() ||
        this.syncVolume() ||
        this.finishWrite(0) ||
        this.finishRead(0) ||
        this.persistBitmap() ||
        this.apply() ||
        this.ack() ||
        (this.engine.stats().inflightBytes > 0 && this.tick(1));
      if (!progressed) break;
    }
    const s = this.engine.stats();
    this.log.push(`quiesced: ${JSON.stringify(s)}`);
    assert.equal(s.queuedTransactions, 0, 'liveness: transactions admitted');
    assert.equal(s.inflightBytes, 0, 'liveness: nothing in flight');
    assert.equal(s.dirtyRegions, 0, 'liveness: resync cleaned every region');
    assert.deepEqual([...this.vol], [...this.rep], 'volume and replica equal after quiescing');
    for (const [txId, writes] of this.txs)
      assert.ok(
        writes.every((w) => w.done),
        `tx${txId} completed`,
      );
  }

  // ---------------------------------------------------------------------------------------------
  // Actions.

  private drain(): void {
    for (let a = this.engine.pollAction(); a !== undefined; a = this.engine.pollAction()) this.perform(a);
    this.checkInvariants();
  }

  private perform(a: Action): void {
    switch (a.type) {
      case 'appendLog': {
        assert.equal(a.record.lsn, this.logHead, 'records are appended at the head');
        const end = this.logHead + recordBytes(a.record);
        assert.ok(end - this.logFreed <= this.config.logCapacity, 'log overrun');
        this.records.push({ record: a.record, end });
        this.logHead = end;
        break;
      }
      case 'syncLog':
        assert.equal(this.syncPending, null, 'one sync at a time');
        assert.equal(a.throughLsn, this.logHead);
        this.syncPending = a.throughLsn;
        break;
      case 'writeVolume': {
        // I2: the durable state marks every region before the volume write is issued.
        const durable = this.recovered(this.logDurable, this.bitmap);
        for (const r of this.regionsOf(a.offset, a.length)) {
          assert.ok(durable.has(r), `I2: volume write u${a.updateId} to region ${r} before a durable record`);
        }
        for (const w of this.inflightWrites.values()) {
          const overlap = w.offset < a.offset + a.length && a.offset < w.offset + w.length;
          assert.ok(
            !overlap,
            `H9: overlapping volume writes u${w.updateId} and u${a.updateId} in flight together`,
          );
        }
        this.seeId(a.updateId, a.offset, a.length);
        this.inflightWrites.set(a.updateId, a);
        break;
      }
      case 'readRegion':
        for (const w of this.inflightWrites.values()) {
          const overlap = w.offset < a.offset + a.length && a.offset < w.offset + w.length;
          assert.ok(!overlap, `H8: resync read u${a.updateId} while write u${w.updateId} is in flight`);
        }
        this.seeId(a.updateId, a.offset, a.length);
        this.pendingReads.set(a.updateId, a);
        break;
      case 'send': {
        assert.ok(this.connected, 'sends only on a connection');
        assert.ok(a.updateId > this.lastSentId, `H10: u${a.updateId} sent after u${this.lastSentId}`);
        this.lastSentId = a.updateId;
        this.lastReleasedId = a.updateId;
        this.maxIdSent = Math.max(this.maxIdSent, a.updateId);
        let sectors: Array<[number, number]>;
        if (a.source.type === 'resync') {
          sectors = this.readData.get(a.updateId)!;
          assert.ok(sectors, 'a resync is sent after its read');
          this.readData.delete(a.updateId);
        } else {
          const content = this.writeContent(a.updateId);
          sectors = [];
          const first = a.offset / SECTOR_BYTES;
          for (let s = first; s < first + a.length / SECTOR_BYTES; s++) sectors.push([s, content]);
        }
        this.wire.push({ updateId: a.updateId, sectors });
        break;
      }
      case 'dropUpdate':
        assert.ok(a.updateId > this.lastReleasedId, 'updates are released in id order');
        this.lastReleasedId = a.updateId;
        this.readData.delete(a.updateId);
        this.liveUpdates.delete(a.updateId);
        break;
      case 'complete': {
        const writes = this.txs.get(a.txId)!;
        assert.ok(
          writes.every((w) => w.done),
          `tx${a.txId} completed before its writes`,
        );
        this.txs.delete(a.txId);
        break;
      }
      case 'persistBitmap': {
        assert.equal(this.bitmapPending, null, 'one bitmap persist at a time');
        const map = IndicatorMap.fromBytes(this.regionCount, a.bitmap.readAll());
        this.bitmapPending = {
          checkpointId: a.checkpointId,
          bits: new Set(map.iterate()),
          coveredLsn: a.coveredLsn,
          idLimit: a.idLimit,
        };
        assert.ok(a.coveredLsn <= this.logHead);
        break;
      }
      case 'freeLog':
        assert.ok(a.upToLsn >= this.logFreed && a.upToLsn <= this.logHead, 'freeLog within the log');
        // Adversarial: the freed records are gone at once (the real log makes it durable later).
        this.logFreed = a.upToLsn;
        this.headerIdLimit = Math.max(this.headerIdLimit, a.idLimit);
        this.records = this.records.filter((r) => r.record.lsn >= a.upToLsn);
        break;
      case 'disconnect':
        this.disconnect();
        break;
      case 'syncVolume':
        assert.equal(this.volSync, null, 'one volume sync at a time');
        this.volSync = { syncId: a.syncId, image: this.vol.slice(), touched: this.volTouched };
        this.volTouched = new Set();
        break;
      case 'sendBarrier':
        assert.ok(this.connected, 'barriers only on a connection');
        assert.ok(
          a.afterUpdateId <= this.lastReleasedId,
          `H13: barrier after u${a.afterUpdateId} before it is sent`,
        );
        break;
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Invariants.

  private checkInvariants(): void {
    // I1 at every instant: for every log prefix that may be durable and either bitmap that may
    // be on disk, recovery marks every region that may differ.
    const must = this.mustBeDirty();
    const bitmaps = this.bitmapPending ? [this.bitmap, this.bitmapPending] : [this.bitmap];
    for (const prefix of this.possiblePrefixes()) {
      for (const bm of bitmaps) {
        const dirty = this.recovered(prefix, bm);
        for (const r of must) {
          assert.ok(
            dirty.has(r),
            `I1: region ${r} may differ but recovery would not mark it (log prefix ${prefix}, bitmap covers ${bm.coveredLsn})`,
          );
        }
      }
    }
    // I3: a clean region has nothing in flight and equal content on both sides.
    const busy = new Set<number>();
    for (const u of this.liveUpdates.values()) for (let r = u.first; r <= u.last; r++) busy.add(r);
    for (let r = 0; r < this.regionCount; r++) {
      if (this.engine.indicator.test(r)) continue;
      assert.ok(!busy.has(r), `I3: region ${r} is clean with an update not yet acked`);
      assert.ok(this.regionEqual(r, this.rep), `I3: region ${r} is clean but differs from the replica`);
      assert.equal(this.engine.pendingCount(r), 0);
    }
  }

  /** Regions whose volume content differs from the replica now or after any prefix of the wire,
   * or that a volume write in flight may change. */
  private mustBeDirty(): Set<number> {
    const out = new Set<number>();
    const rep = this.rep.slice();
    for (let k = 0; ; k++) {
      for (let r = 0; r < this.regionCount; r++) if (!this.regionEqual(r, rep)) out.add(r);
      if (k === this.wire.length) break;
      for (const [s, c] of this.wire[k].sectors) rep[s] = c;
    }
    for (const a of this.inflightWrites.values())
      for (const r of this.regionsOf(a.offset, a.length)) out.add(r);
    // A volume write not known durable may be undone by a power loss.
    for (const r of this.volTouched) out.add(r);
    if (this.volSync) for (const r of this.volSync.touched) out.add(r);
    return out;
  }

  /** Reference recovery: the bitmap plus every begin record at or after its covered position,
   * within the live log up to `prefix`, without a completion record in that prefix. */
  private recovered(prefix: number, bm: Bitmap): Set<number> {
    const dirty = new Set(bm.bits);
    const live = new Map<number, Array<[number, number]>>();
    for (const { record, end } of this.records) {
      if (end > prefix || record.lsn < this.logFreed) continue;
      if (record.type === 'begin' && record.lsn >= bm.coveredLsn) live.set(record.lsn, record.ranges);
      else if (record.type === 'complete') for (const b of record.begins) live.delete(b);
    }
    for (const ranges of live.values())
      for (const [f, n] of ranges) for (let r = f; r < f + n; r++) dirty.add(r);
    return dirty;
  }

  /** Record boundaries between the durable and the appended length. */
  private possiblePrefixes(): number[] {
    const out = [this.logDurable];
    for (const { end } of this.records) if (end > this.logDurable) out.push(end);
    return out;
  }

  private cutLink(): void {
    this.connected = false;
    this.wire = [];
    this.ackable = [];
    this.lastSentId = 0;
    // Lost with the link: the engine must keep their regions dirty.
    this.liveUpdates.clear();
  }

  private applyWrite(a: Extract<Action, { type: 'writeVolume' }>): void {
    const content = this.writeContent(a.updateId);
    const first = a.offset / SECTOR_BYTES;
    for (let s = first; s < first + a.length / SECTOR_BYTES; s++) this.vol[s] = content;
    if (this.config.volumeWritesDurable) {
      for (let s = first; s < first + a.length / SECTOR_BYTES; s++) this.volDurable[s] = content;
    } else {
      for (const r of this.regionsOf(a.offset, a.length)) this.volTouched.add(r);
    }
  }

  /** The bytes of update u (zero and trim are content too, H7: just another value). */
  private writeContent(updateId: number): number {
    return updateId + this.contentId;
  }

  private seeId(updateId: number, offset: number, length: number): void {
    assert.ok(updateId > 0);
    const rs = this.regionsOf(offset, length);
    this.liveUpdates.set(updateId, { first: rs[0], last: rs[rs.length - 1] });
  }

  private regionsOf(offset: number, length: number): number[] {
    const out: number[] = [];
    const rs = this.config.regionSize;
    for (let r = Math.floor(offset / rs); r <= Math.floor((offset + length - 1) / rs); r++) out.push(r);
    return out;
  }

  private regionEqual(r: number, rep: Int32Array): boolean {
    const s0 = r * this.sectorsPerRegion;
    for (let s = s0; s < s0 + this.sectorsPerRegion; s++) if (this.vol[s] !== rep[s]) return false;
    return true;
  }
}
