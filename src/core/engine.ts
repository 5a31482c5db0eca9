/**
 * The replication engine core: a deterministic state machine with no I/O (DESIGN.md §2, §4).
 *
 * Dev notes. The shell feeds events in (`submitTransaction`, `handle*`, with `now` in ms that
 * never decreases) and drains actions with `pollAction()` after every event, performing them in
 * order. The core never holds data: a write is known by its update id, and the shell keeps the
 * buffer for it from `writeVolume` until `send` or `dropUpdate`.
 *
 * Object model:
 * - `indicator` is the dirty bitmap; `pending` holds, per region with unacked updates, how many
 *   there are and whether the region is dirty beyond them (`stale`: lost updates, recovery).
 * - Every write or resync is an `Op` with its update id. Ops move log → order → io → ready →
 *   sent, then leave on ack (or are dropped when there is no connection).
 * - `cover` is the activity window: region → the begin record (`LogTx`) that covers it. A
 *   covered region needs no new record; a clean covered region sits in an LRU list and is evicted
 *   when the window is over size; a dirty one is pinned (H11).
 * - A checkpoint snapshots the indicator map and ends all coverage at once (H1); once the
 *   bitmap is persisted, every record before the snapshot's log position is free.
 * - Volume durability: `volumeUnsynced` holds regions with volume writes finished since the
 *   last volume sync was issued. A clean region leaves the window only after a sync that came
 *   after its writes (H15); FLUSH and FUA wait for such a sync too, so every sync is the
 *   engine's and counts for all three. Until the first sync after start, the volume may hold a
 *   dead process's unsynced writes: nothing is read for a resync before it (H17).
 * - Barriers (H13, H16) and the resync's begin and end marks go into the same ordered stream
 *   as the updates: a FLUSH or a FUA write puts a barrier after every update issued before it.
 * - Sync mode: a transaction completes only once each of its updates is acked or lost (lost
 *   when the link drops: it then completes locally and its regions stay dirty).
 */
import assert from 'node:assert/strict';
import { VolrepError } from '../errors.js';
import { type FrozenBits, IndicatorMap } from './indicator-map.js';
import { Queue } from './queue.js';
import {
  beginRecordBytes,
  CHECKPOINT_RECORD_BYTES,
  completeRecordBytes,
  type LogRecord,
  RECORD_COMPLETES_MAX,
  RECORD_RANGES_MAX,
  RESERVE_RECORD_BYTES,
  recordBytes,
} from './records.js';

export const REGION_SIZE_MIN = 4096;
export const REGION_SIZE_MAX = 16 * 1024 * 1024;
/** The log must hold this many of the largest begin records (besides the resync reserve). */
export const LOG_CAPACITY_RECORDS_MIN = 4;
/** Writes per transaction: one range each in the begin record. */
export const TX_WRITES_MAX = RECORD_RANGES_MAX;
/**
 * Bytes of one write, and so of one update on the stream (the replication frame is sized from
 * it); the library splits larger writes into several. Also NBD's largest request.
 */
export const WRITE_BYTES_MAX = 32 * 1024 * 1024;
/** In-flight accounting charge for an update without a data buffer (zero, trim). */
export const UPDATE_OVERHEAD_BYTES = 64;
/** Update ids reserved per durable reservation; one log sync per this many updates at most. */
export const ID_RESERVE_BLOCK = 1 << 20;
/** Reserve the next block when fewer than this many ids are left, so sends rarely wait. */
export const ID_RESERVE_LOW_WATER = ID_RESERVE_BLOCK / 2;
/** Resync reads in flight at once (each is also charged to the in-flight bytes). */
export const RESYNC_OPS_MAX = 64;
/** Free log space in batches of at least capacity / this (each free costs the log a sync). */
export const LOG_FREE_FRACTION = 4;
/** Log bytes kept back from client transactions so a resync can always reserve ids. */
export const LOG_RESYNC_RESERVE_BYTES = RESERVE_RECORD_BYTES * 4;
/**
 * Pinned (dirty) window entries beyond the window size that trigger a checkpoint (I6: while
 * the secondary is away, written regions stay dirty and pinned; a checkpoint unpins them).
 * Not smaller: each checkpoint writes the whole bitmap (32 MiB for 16 TiB in 64 KiB regions).
 */
export const WINDOW_PINNED_MAX = 65536;
/** While clean regions wait on a volume sync to leave the window, ask for one at least this often. */
export const VOLUME_SYNC_INTERVAL_MS = 1000;
/** ...or as soon as this many regions hold volume writes not known durable. */
export const VOLUME_SYNC_REGIONS_MAX = 65536;

export type WriteKind = 'data' | 'zero' | 'trim';

export interface WriteRequest {
  offset: number;
  length: number;
  kind: WriteKind;
}

export interface EngineConfig {
  /** Volume size in bytes. */
  volumeSize: number;
  /** Region size in bytes: a power of two, 4 KiB to 16 MiB. */
  regionSize: number;
  /** Bytes of the circular log area (the log file minus its header). */
  logCapacity: number;
  /** Activity window size, in regions. */
  activityWindowRegions: number;
  /** Bound on bytes of updates admitted and not yet acked or dropped (I6). */
  inflightBytesMax: number;
  /** The oldest sent update unacked for this long triggers a checkpoint and a disconnect. */
  ackTimeoutMs: number;
  /** Writes per transaction, at most TX_WRITES_MAX (the default); small values allow tiny logs. */
  txWritesMax?: number;
  /**
   * True when a finished volume write is already durable (O_DSYNC, no volatile cache). By
   * default it is not: a region leaves the activity window, and a checkpoint may report it
   * clean, only after a `syncVolume` that followed its writes (else a power loss could take the
   * write back off the volume while the replica keeps it, with nothing marking the region).
   */
  volumeWritesDurable?: boolean;
  /**
   * Sync mode (while connected): a transaction completes once the secondary has written all its
   * updates (`handleWritten`); with FUA, once it acked them durable; a FLUSH once the secondary
   * acked durable every update before it.
   */
  syncMode?: boolean;
}

/** Options of one client transaction. */
export interface TransactionOptions {
  /**
   * Force unit access: the transaction completes only once its writes are durable on the volume,
   * and it is a barrier on the stream (H16): on the replica it is durable before anything issued
   * after it is written there.
   */
  fua?: boolean;
}

/** The smallest log capacity for a configuration. */
export function logCapacityMin(txWritesMax = TX_WRITES_MAX): number {
  return LOG_CAPACITY_RECORDS_MIN * beginRecordBytes(txWritesMax) + LOG_RESYNC_RESERVE_BYTES;
}

/** What crash recovery found (src/log/recovery.ts builds it). */
export interface RecoveredState {
  /**
   * Indicator bytes: the persisted bitmap plus every location of an incomplete transaction. The
   * engine takes them over as its map (no copy): nothing else may use them afterwards.
   */
  dirty: Uint8Array;
  /** Above every update id ever issued (H14). */
  idLimit: number;
  /** First byte of the oldest record still in the log. */
  logTailLsn: number;
  /** Where the next record goes. */
  logHeadLsn: number;
}

export type UpdateSource =
  | { type: 'write'; txId: number; index: number }
  | { type: 'resync'; region: number };

export type Action =
  /** Append a record to the log's in-memory batch (its lsn is the log's current head). */
  | { type: 'appendLog'; record: LogRecord }
  /** Write every appended record and fdatasync; then call handleLogSynced(throughLsn). */
  | { type: 'syncLog'; throughLsn: number }
  /** Write the transaction's write `index` to the volume; then call handleVolumeWritten(updateId). */
  | {
      type: 'writeVolume';
      updateId: number;
      txId: number;
      index: number;
      offset: number;
      length: number;
      kind: WriteKind;
    }
  /** Read a region for resync now; then call handleResyncRead(updateId) and keep the bytes. */
  | { type: 'readRegion'; updateId: number; region: number; offset: number; length: number }
  /** Put the update on the replication stream (ids arrive here in increasing order, H10). */
  | { type: 'send'; updateId: number; offset: number; length: number; kind: WriteKind; source: UpdateSource }
  /** No connection: forget the update's buffer without sending it (its region stays dirty). */
  | { type: 'dropUpdate'; updateId: number; source: UpdateSource }
  /**
   * The transaction is done: every write is on the volume (durably, with FUA) and, in sync
   * mode, acked or lost. Reply to the client.
   */
  | { type: 'complete'; txId: number }
  /** A FLUSH is done: every write completed before it is durable on the volume. */
  | { type: 'flushed'; flushId: number }
  /** Write the bitmap atomically; then call handleBitmapPersisted(checkpointId). */
  | { type: 'persistBitmap'; checkpointId: number; bitmap: FrozenBits; coveredLsn: number; idLimit: number }
  /** Records before `upToLsn` are no longer needed; the log may reuse their space. */
  | { type: 'freeLog'; upToLsn: number; idLimit: number }
  /** The secondary did not ack in time: drop the connection (then call handleDisconnected). */
  | { type: 'disconnect'; reason: 'ack-timeout' }
  /** fdatasync the volume; then call handleVolumeSynced(syncId). */
  | { type: 'syncVolume'; syncId: number }
  /**
   * Put a barrier on the stream after update `afterUpdateId` (H13): the secondary makes all
   * updates before it durable before applying any after it. `resyncEnd` also tells it the
   * resync is over (consistent again once durable). Only while connected.
   */
  | { type: 'sendBarrier'; barrierId: number; afterUpdateId: number; kind: BarrierKind }
  /** Before anything else on this connection: a resync starts (the replica is inconsistent). */
  | { type: 'sendResyncBegin' }
  /** The marks of a markAllDirty() are durable: the full sync may start. */
  | { type: 'allDirtyDurable' };

export type BarrierKind = 'flush' | 'resyncEnd';

type OpState = 'log' | 'order' | 'io' | 'ready' | 'sent';

interface ClientTx {
  id: number;
  writes: WriteRequest[];
  bytes: number;
  /** Volume writes not yet finished. */
  remaining: number;
  /** Updates not yet acked or lost (a FUA transaction in sync mode waits for them). */
  unsettled: number;
  /** Updates not yet written on the replica, acked or lost (sync mode waits for them). */
  unwritten: number;
  fua: boolean;
  /** With FUA: the volume sync id that makes its writes durable (0: none needed). */
  syncNeeded: number;
  completed: boolean;
}

/** One update: a client write or a resync of one region. */
interface Op {
  id: number;
  tx: ClientTx | null;
  index: number;
  resync: boolean;
  kind: WriteKind;
  offset: number;
  length: number;
  first: number;
  last: number;
  /** Log position that must be durable before the volume write (I2). */
  needLsn: number;
  state: OpState;
  bytes: number;
  sentAtMs: number;
  /** Sync mode: counted as written on the replica (or acked, or lost) in its transaction. */
  written: boolean;
}

/** A begin record in the log, as long as it is not free. */
interface LogTx {
  lsn: number;
  endLsn: number;
  /** Regions this record covers in the activity window. */
  live: number;
  /** Every region it covered left the window clean; its completion is appended. */
  done: boolean;
}

/** A region in the activity window. Clean ones are linked in LRU order. */
interface Cover {
  region: number;
  tx: LogTx;
  prev: Cover | null;
  next: Cover | null;
  inLru: boolean;
}

/** Per region with unacked updates (the update set, as a count: ids are acked in order). */
interface Pending {
  count: number;
  /** Dirty beyond these updates: an ack that empties the set must not reset it (H12). */
  stale: boolean;
}

interface Checkpoint {
  id: number;
  coveredLsn: number;
  idLimit: number;
}

export interface EngineStats {
  dirtyRegions: number;
  pendingRegions: number;
  windowRegions: number;
  inflightBytes: number;
  /** Updates issued and not yet acked or dropped (client writes and resyncs). */
  pendingUpdates: number;
  /** Begin records still holding log space. */
  activeTransactions: number;
  queuedTransactions: number;
  logHeadLsn: number;
  logDurableLsn: number;
  logFreedLsn: number;
  nextUpdateId: number;
  connected: boolean;
  resyncing: boolean;
  checkpointInFlight: boolean;
  /** The first volume sync after start is done (H17). */
  volumeTrusted: boolean;
}

export class Engine {
  readonly config: Readonly<EngineConfig>;
  readonly regionCount: number;
  readonly txWritesMax: number;
  /** The indicator map (read it, never write it from outside). */
  readonly indicator: IndicatorMap;

  private readonly actions = new Queue<Action>();
  private nowMs = 0;

  // Update sets and ops.
  private readonly pending = new Map<number, Pending>();
  private readonly ops = new Map<number, Op>();
  private readonly regionOps = new Map<number, Op[]>();
  private nextId: number;
  private nextReleaseId: number;
  private lastSentId: number;
  private ackedId: number;
  private inflightBytes = 0;
  private readonly sentQueue = new Queue<Op>();
  /** Sync mode: client updates sent and not yet reported written, in id order. */
  private readonly unwrittenQueue = new Queue<Op>();
  /**
   * Sync mode: FLUSHes that wait for the replica to hold durably every update before them, by
   * flush id (`volumeSynced`: the local part is done already).
   */
  private readonly replicaFlushes = new Map<number, { afterId: number; volumeSynced: boolean }>();

  // Client transactions.
  private nextTxId = 1;
  private readonly admitQueue = new Queue<ClientTx>();

  // Log.
  private logHead: number;
  private logDurable: number;
  private logFreed: number;
  private syncInFlight: number | null = null;
  private syncWanted: number;
  private logWaiters: Op[] = [];
  private readonly txQueue = new Queue<LogTx>();
  private completions: number[] = [];
  private spaceWanted = false;

  // Update-id reservation (H14).
  private idLimit: number;
  private idLimitAppended: number;
  private durableIdLimit: number;
  private readonly limitWaits = new Queue<{ limit: number; endLsn: number }>();

  // Activity window.
  private readonly cover = new Map<number, Cover>();
  private lruHead: Cover | null = null;
  private lruTail: Cover | null = null;

  // Checkpoints.
  private checkpoint: Checkpoint | null = null;
  private checkpointAgain = false;
  private nextCheckpointId = 1;
  private bitmapCoveredLsn: number;

  // Volume durability: regions with volume writes finished since the last volume sync was
  // issued, those being synced now, and clean window regions waiting for that to leave.
  private readonly volumeWritesDurable: boolean;
  private volumeUnsynced = new Set<number>();
  private volumeSyncing: Set<number> | null = null;
  private volumeSyncId = 0;
  private volumeSyncDone = 0;
  private lastVolumeSyncMs = 0;
  private readonly evictWait = new Set<number>();
  /** H17: false until a volume sync issued after start is done (the volume may hold a dead process's unsynced writes). */
  private volumeTrusted: boolean;
  /** FUA transactions and FLUSHes waiting for a volume sync (`need`: its id), in id order. */
  private readonly syncWaiters = new Queue<{ need: number; tx: ClientTx | null; flushId: number }>();
  private nextFlushId = 1;

  // Barriers (H13, H16), in id order.
  private readonly barriers = new Queue<{ barrierId: number; afterUpdateId: number; kind: BarrierKind }>();
  private nextBarrierId = 1;

  // Connection and resync.
  private connected = false;
  private ackTimeoutFired = false;
  private resyncing = false;
  private resyncCursor = 0;
  private readonly resyncRetry = new Set<number>();
  private resyncOps = 0;
  /** A resync mark went out on this connection; its end mark goes once the replica caught up. */
  private resyncEndPending = false;
  /**
   * Transactions with a smaller id were submitted before this connection (made apart, DESIGN.md
   * §7): the resync-end mark waits until all of them are admitted, so that it covers them.
   */
  private connectedAtTxId = 0;
  /** The checkpoint id whose completion makes a markAllDirty() durable (0: none asked). */
  private allDirtyCheckpoint = 0;
  private readonly syncMode: boolean;

  constructor(config: EngineConfig, recovered?: RecoveredState) {
    validateConfig(config);
    this.config = { ...config };
    this.txWritesMax = config.txWritesMax ?? TX_WRITES_MAX;
    this.volumeWritesDurable = config.volumeWritesDurable ?? false;
    this.syncMode = config.syncMode ?? false;
    this.regionCount = Math.ceil(config.volumeSize / config.regionSize);
    // The recovered bits become the map (one bit per region is 30 MiB for 15 TiB: no copy).
    this.indicator = recovered
      ? IndicatorMap.adopt(this.regionCount, recovered.dirty)
      : new IndicatorMap(this.regionCount);
    const idLimit = recovered ? recovered.idLimit : 1;
    assert.ok(Number.isSafeInteger(idLimit) && idLimit >= 1);
    this.nextId = idLimit;
    this.nextReleaseId = idLimit;
    this.lastSentId = idLimit - 1;
    this.ackedId = idLimit - 1;
    this.idLimit = idLimit;
    this.idLimitAppended = idLimit;
    this.durableIdLimit = idLimit;
    const head = recovered ? recovered.logHeadLsn : 0;
    const tail = recovered ? recovered.logTailLsn : 0;
    assert.ok(tail <= head && head - tail <= config.logCapacity, 'recovered log bounds');
    this.logHead = head;
    this.logDurable = head;
    this.logFreed = tail;
    this.syncWanted = head;
    this.bitmapCoveredLsn = tail;
    if (recovered) {
      // The old records stay needed until a bitmap holding what they say is persisted.
      if (head > tail) this.txQueue.push({ lsn: tail, endLsn: head, live: 0, done: false });
      // Recovered dirty regions have no update in flight: only a resync can clean them.
      this.startCheckpoint();
    }
    // H17: after a process kill the page cache still holds the dead process's volume writes,
    // unsynced; a resync must not read them (and an ack clear their regions) before a sync.
    this.volumeTrusted = this.volumeWritesDurable;
    if (!this.volumeTrusted) this.issueVolumeSync();
  }

  // ---------------------------------------------------------------------------------------------
  // Getters

  get now(): number {
    return this.nowMs;
  }

  isConnected(): boolean {
    return this.connected;
  }

  /** Unacked updates touching the region (the size of its update set). */
  pendingCount(region: number): number {
    return this.pending.get(region)?.count ?? 0;
  }

  /** Whether a durable-or-pending begin record covers the region in the activity window. */
  isCovered(region: number): boolean {
    return this.cover.has(region);
  }

  stats(): EngineStats {
    return {
      dirtyRegions: this.indicator.count,
      pendingRegions: this.pending.size,
      windowRegions: this.cover.size,
      inflightBytes: this.inflightBytes,
      pendingUpdates: this.ops.size,
      activeTransactions: this.txQueue.length,
      queuedTransactions: this.admitQueue.length,
      logHeadLsn: this.logHead,
      logDurableLsn: this.logDurable,
      logFreedLsn: this.logFreed,
      nextUpdateId: this.nextId,
      connected: this.connected,
      resyncing: this.resyncing,
      checkpointInFlight: this.checkpoint !== null,
      volumeTrusted: this.volumeTrusted,
    };
  }

  /** The next action to perform, in order, or undefined when there is nothing to do. */
  pollAction(): Action | undefined {
    return this.actions.shift();
  }

  /** Every queued action, in order. */
  pollActions(): Action[] {
    const out: Action[] = [];
    for (let a = this.actions.shift(); a !== undefined; a = this.actions.shift()) out.push(a);
    return out;
  }

  // ---------------------------------------------------------------------------------------------
  // Events

  /**
   * A client transaction of one or more writes. Returns its id; `complete` with that id follows
   * once every write is on the volume (durably with `fua`; in sync mode also written on the
   * replica, durably with `fua`). It waits (backpressure) while the in-flight window or the log
   * is full.
   */
  submitTransaction(writes: WriteRequest[], now: number, options: TransactionOptions = {}): number {
    this.advanceTime(now);
    this.checkTransaction(writes);
    let bytes = 0;
    for (const w of writes) bytes += updateBytes(w.kind, w.length);
    const tx: ClientTx = {
      id: this.nextTxId,
      writes: writes.map((w) => ({ ...w })),
      bytes,
      remaining: writes.length,
      unsettled: writes.length,
      unwritten: writes.length,
      fua: options.fua === true,
      syncNeeded: 0,
      completed: false,
    };
    this.nextTxId += 1;
    this.admitQueue.push(tx);
    this.pump();
    return tx.id;
  }

  /** Throws VOLREP_ERR_REQUEST for a transaction submitTransaction would refuse; changes nothing. */
  checkTransaction(writes: readonly WriteRequest[]): void {
    if (writes.length === 0 || writes.length > this.txWritesMax) {
      throw new VolrepError('VOLREP_ERR_REQUEST', `a transaction has 1 to ${this.txWritesMax} writes`);
    }
    for (const w of writes) this.validateWrite(w);
  }

  /** The log is durable through `throughLsn` (the value of the syncLog action). */
  handleLogSynced(throughLsn: number, now: number): void {
    this.advanceTime(now);
    if (this.syncInFlight === null || throughLsn !== this.syncInFlight) {
      throw new VolrepError('VOLREP_ERR_STATE', `log sync through ${throughLsn} was not requested`);
    }
    this.syncInFlight = null;
    this.logDurable = throughLsn;
    while ((this.limitWaits.peek()?.endLsn ?? Number.POSITIVE_INFINITY) <= this.logDurable) {
      this.durableIdLimit = Math.max(this.durableIdLimit, this.limitWaits.shift()!.limit);
    }
    // H6: writes behind this sync may go now, and only now.
    const waiters = this.logWaiters;
    this.logWaiters = [];
    for (const op of waiters) {
      if (op.needLsn <= this.logDurable) {
        op.state = 'order';
        this.issueIfFirst(op);
      } else {
        this.logWaiters.push(op);
      }
    }
    this.pump();
  }

  /** A `writeVolume` finished. */
  handleVolumeWritten(updateId: number, now: number): void {
    this.advanceTime(now);
    const op = this.ops.get(updateId);
    if (op === undefined || op.resync || op.state !== 'io') {
      throw new VolrepError('VOLREP_ERR_STATE', `no volume write ${updateId} in progress`);
    }
    this.finishVolumeIo(op);
    if (!this.volumeWritesDurable) {
      for (let r = op.first; r <= op.last; r++) this.volumeUnsynced.add(r);
    }
    const tx = op.tx!;
    tx.remaining -= 1;
    if (tx.remaining === 0 && tx.fua) {
      // FUA: durable before it completes, by a volume sync issued after its last write.
      tx.syncNeeded = this.waitForVolumeSync(tx, 0);
    }
    this.maybeComplete(tx);
    this.pump();
  }

  /** A `readRegion` finished; the shell holds the bytes until `send` or `dropUpdate`. */
  handleResyncRead(updateId: number, now: number): void {
    this.advanceTime(now);
    const op = this.ops.get(updateId);
    if (op === undefined || !op.resync || op.state !== 'io') {
      throw new VolrepError('VOLREP_ERR_STATE', `no resync read ${updateId} in progress`);
    }
    this.resyncOps -= 1;
    this.finishVolumeIo(op);
    this.pump();
  }

  /** The secondary says every update up to `updateId` is durable on the replica. */
  handleAck(updateId: number, now: number): void {
    this.advanceTime(now);
    if (!this.connected) return; // a late message from a closed connection
    if (!Number.isSafeInteger(updateId) || updateId > this.lastSentId) {
      throw new VolrepError(
        'VOLREP_ERR_PROTOCOL',
        `ack for ${updateId}, but the last update sent is ${this.lastSentId}`,
      );
    }
    this.processAck(updateId);
    this.pump();
  }

  /** Sync mode: the secondary wrote (not yet synced) every update up to `updateId`. */
  handleWritten(updateId: number, now: number): void {
    this.advanceTime(now);
    if (!this.connected) return; // a late message from a closed connection
    if (!Number.isSafeInteger(updateId) || updateId > this.lastSentId) {
      throw new VolrepError(
        'VOLREP_ERR_PROTOCOL',
        `written up to ${updateId}, but the last update sent is ${this.lastSentId}`,
      );
    }
    while ((this.unwrittenQueue.peek()?.id ?? Number.POSITIVE_INFINITY) <= updateId)
      this.markWritten(this.unwrittenQueue.shift()!);
    this.pump();
  }

  /** Sync mode: one fewer update of its transaction to wait for on the replica. */
  private markWritten(op: Op): void {
    if (op.written || op.tx === null) return;
    op.written = true;
    op.tx.unwritten -= 1;
    this.maybeComplete(op.tx);
  }

  /** A FLUSH's local part (the volume sync) is done; in sync mode it may wait for the replica too. */
  private flushVolumeSynced(flushId: number): void {
    const wait = this.replicaFlushes.get(flushId);
    if (wait !== undefined) wait.volumeSynced = true;
    else this.emit({ type: 'flushed', flushId });
  }

  /** Sync mode: FLUSHes whose updates are all durable on the replica (every one: the link is gone). */
  private releaseReplicaFlushes(linkGone: boolean): void {
    for (const [flushId, wait] of this.replicaFlushes) {
      if (!linkGone && wait.afterId > this.ackedId) break; // in flush order, so in afterId order
      this.replicaFlushes.delete(flushId);
      if (wait.volumeSynced) this.emit({ type: 'flushed', flushId });
    }
  }

  /** The connection is gone: everything on the wire is lost (step 6). */
  handleDisconnected(now: number): void {
    this.advanceTime(now);
    if (!this.connected) return;
    this.connected = false;
    this.ackTimeoutFired = false;
    this.resyncing = false;
    this.resyncEndPending = false;
    this.resyncRetry.clear();
    // A resync end not yet on the stream belonged to this connection: the next one resyncs anew.
    const barriers = [...this.barriers].filter((b) => b.kind !== 'resyncEnd');
    this.barriers.clear();
    for (const b of barriers) this.barriers.push(b);
    for (let op = this.sentQueue.shift(); op !== undefined; op = this.sentQueue.shift())
      this.retire(op, true);
    this.unwrittenQueue.clear();
    // Sync mode degrades while the link is down: what the FLUSH covered is dirty, resynced later.
    this.releaseReplicaFlushes(true);
    this.startCheckpoint();
    this.pump();
  }

  /**
   * A connection to the secondary is up; `lastAppliedId` is the last update it holds durably
   * (H14: treated like an ack, never more). Starts a resync of every dirty region (step 7). If
   * there is any, or the replica says it is not consistent (a resync was cut short), the stream
   * opens with a resync mark and, once the replica has caught up, a resync-end barrier.
   */
  handleConnected(lastAppliedId: number, now: number, replicaConsistent = true): void {
    this.advanceTime(now);
    if (this.connected) throw new VolrepError('VOLREP_ERR_STATE', 'already connected');
    if (!Number.isSafeInteger(lastAppliedId) || lastAppliedId < 0 || lastAppliedId >= this.nextId) {
      throw new VolrepError(
        'VOLREP_ERR_PROTOCOL',
        `the secondary reports update ${lastAppliedId}, which this primary never issued (next id ${this.nextId})`,
      );
    }
    assert.equal(this.sentQueue.length, 0);
    this.connected = true;
    this.ackedId = Math.max(this.ackedId, Math.min(lastAppliedId, this.lastSentId));
    this.resyncing = true;
    this.resyncCursor = 0;
    this.connectedAtTxId = this.nextTxId;
    // A transaction still waiting for admission was made apart, and its regions are not dirty yet:
    // the replica is not a state this side had until it holds that too.
    if (this.indicator.count > 0 || !replicaConsistent || this.admitQueue.length > 0) {
      // First on the connection, before any update: the replica is inconsistent from here on.
      this.emit({ type: 'sendResyncBegin' });
      this.resyncEndPending = true;
    }
    this.pump();
  }

  /** The bitmap of a `persistBitmap` action is durable. */
  handleBitmapPersisted(checkpointId: number, now: number): void {
    this.advanceTime(now);
    const cp = this.checkpoint;
    if (cp === null || cp.id !== checkpointId) {
      throw new VolrepError('VOLREP_ERR_STATE', `checkpoint ${checkpointId} is not in progress`);
    }
    this.checkpoint = null;
    this.finishCheckpoint(cp);
    if (this.allDirtyCheckpoint !== 0 && cp.id >= this.allDirtyCheckpoint) {
      this.allDirtyCheckpoint = 0;
      this.emit({ type: 'allDirtyDurable' });
    }
    if (this.checkpointAgain) {
      this.checkpointAgain = false;
      this.startCheckpoint();
    }
    this.pump();
  }

  /** Time passes: checks the ack timeout. */
  handleTick(now: number): void {
    this.advanceTime(now);
    const oldest = this.sentQueue.peek();
    if (
      this.connected &&
      !this.ackTimeoutFired &&
      oldest &&
      now >= oldest.sentAtMs + this.config.ackTimeoutMs // the same sum as nextDeadline(): no float gap
    ) {
      // Step 6: no ack in time. Persist the bitmap and have the shell drop the connection.
      this.ackTimeoutFired = true;
      this.startCheckpoint();
      this.emit({ type: 'disconnect', reason: 'ack-timeout' });
    }
    this.pump();
  }

  /** The volume sync of a `syncVolume` action is done: what it covered is durable. */
  handleVolumeSynced(syncId: number, now: number): void {
    this.advanceTime(now);
    if (this.volumeSyncing === null || syncId !== this.volumeSyncId) {
      throw new VolrepError('VOLREP_ERR_STATE', `volume sync ${syncId} is not in progress`);
    }
    const synced = this.volumeSyncing;
    this.volumeSyncing = null;
    this.volumeSyncDone = syncId;
    this.volumeTrusted = true;
    for (const r of synced) {
      // Clean regions whose writes are now durable may leave the window (if a checkpoint
      // ended their coverage, they are clean for the next checkpoint's bitmap).
      if (this.evictWait.has(r) && !this.volumeUnsynced.has(r)) {
        this.evictWait.delete(r);
        const c = this.cover.get(r);
        if (c !== undefined) this.lruPush(c);
      }
    }
    for (let w = this.syncWaiters.peek(); w !== undefined && w.need <= syncId; w = this.syncWaiters.peek()) {
      this.syncWaiters.shift();
      if (w.tx !== null) this.maybeComplete(w.tx);
      else this.flushVolumeSynced(w.flushId);
    }
    this.pump();
  }

  /**
   * A FLUSH from a client (H13): returns its id; `flushed` follows once every write completed
   * before it is durable on the volume, and a barrier goes on the stream after every update
   * issued so far (if connected then), so the replica orders around it the same way.
   */
  submitFlush(now: number): number {
    this.advanceTime(now);
    const flushId = this.nextFlushId;
    this.nextFlushId += 1;
    const afterId = this.nextId - 1;
    this.pushBarrier('flush', afterId);
    if (this.syncMode && this.connected && afterId > this.ackedId)
      this.replicaFlushes.set(flushId, { afterId, volumeSynced: false });
    if (this.waitForVolumeSync(null, flushId) === 0) this.flushVolumeSynced(flushId);
    this.pump();
    return flushId;
  }

  /** Persist the bitmap now (clean shutdown, operator request). */
  requestCheckpoint(now: number): void {
    this.advanceTime(now);
    this.startCheckpoint();
    this.pump();
  }

  /**
   * A full sync: every region may differ from the replica (a brand-new pair whose replica holds
   * unknown bytes), or those of `bits`. Marks them and starts a checkpoint; the marks are durable once it
   * completes, and nothing may be sent to the replica before that (the caller connects after).
   */
  markAllDirty(now: number, bits?: Uint8Array): void {
    this.advanceTime(now);
    if (this.connected) throw new VolrepError('VOLREP_ERR_STATE', 'mark everything dirty before connecting');
    // `bits`: only these (the regions a secondary itself may hold differently).
    if (bits === undefined) this.indicator.setAll();
    else this.indicator.union(bits);
    // Regions with updates in flight are now dirty beyond them: an ack must not clean them (H12).
    for (const entry of this.pending.values()) entry.stale = true;
    // The checkpoint that snapshots this: the one started now, or the next if one is in flight.
    this.allDirtyCheckpoint = this.nextCheckpointId;
    this.startCheckpoint();
    this.pump();
  }

  /**
   * When the engine next needs `handleTick`: the ack timeout of the oldest update sent, or the
   * interval after which clean regions waiting to leave the window get their volume sync.
   * Infinity when nothing is due.
   */
  nextDeadline(): number {
    let at = Number.POSITIVE_INFINITY;
    const oldest = this.sentQueue.peek();
    if (this.connected && !this.ackTimeoutFired && oldest !== undefined) {
      at = oldest.sentAtMs + this.config.ackTimeoutMs;
    }
    if (this.volumeSyncing === null && this.volumeUnsynced.size > 0 && this.evictWait.size > 0) {
      at = Math.min(at, this.lastVolumeSyncMs + VOLUME_SYNC_INTERVAL_MS);
    }
    return at;
  }

  /**
   * Whether the replica, once it applies everything sent so far, is a state the volume really
   * had: connected, the resync pass done, every transaction submitted before the connection
   * admitted, and every dirty region dirty only because of updates already on their way in
   * order. O(updates in flight), never O(regions).
   */
  replicaCaughtUp(): boolean {
    if (!this.connected || this.resyncing || this.resyncRetry.size > 0) return false;
    if ((this.admitQueue.peek()?.id ?? this.nextTxId) < this.connectedAtTxId) return false;
    let inFlight = 0;
    for (const entry of this.pending.values()) {
      if (entry.stale) return false;
      inFlight += 1;
    }
    return this.indicator.count === inFlight;
  }

  // ---------------------------------------------------------------------------------------------
  // Step 1: mark.

  /**
   * Step 1. Sets the indicator of every region the update touches and adds the update to each
   * region's update set, before anything else happens to those regions: a region with a write
   * in progress is never clean.
   */
  private markRegions(op: Op): void {
    for (let r = op.first; r <= op.last; r++) {
      const wasSet = this.indicator.set(r);
      const entry = this.pending.get(r);
      if (entry === undefined) {
        // Dirty with an empty set means lost updates or a recovered region (H12): keep it dirty.
        this.pending.set(r, { count: 1, stale: wasSet && !op.resync });
      } else {
        assert.ok(wasSet, 'a region with pending updates is dirty');
        entry.count += 1;
      }
      const c = this.cover.get(r);
      if (c?.inLru) this.lruRemove(c); // dirty: pinned in the window (H11)
      this.evictWait.delete(r);
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Step 2: log the locations.

  /**
   * Step 2. Appends one begin record for every region the transaction writes that the activity
   * window does not cover (H2: a bit in the persisted bitmap does not count), and sets each
   * write's `needLsn`: the end of the newest record covering any of its regions. A write waits
   * for that record to be durable, also when it skips logging behind an appended record (H6).
   */
  private logTransaction(txOps: Op[]): void {
    const ranges: Array<[number, number]> = [];
    for (const op of txOps) {
      for (let r = op.first; r <= op.last; r++) {
        if (!this.cover.has(r)) {
          ranges.push([op.first, op.last - op.first + 1]);
          break;
        }
      }
    }
    if (ranges.length > 0) {
      const merged = mergeRanges(ranges);
      const tx: LogTx = { lsn: this.logHead, endLsn: 0, live: 0, done: false };
      this.appendRecord({ type: 'begin', lsn: this.logHead, idLimit: this.idLimit, ranges: merged }, true);
      tx.endLsn = this.logHead;
      this.txQueue.push(tx);
      for (const [first, count] of merged) {
        for (let r = first; r < first + count; r++) {
          // A region already covered keeps its older record; the new one just repeats it.
          if (this.cover.has(r)) continue;
          this.cover.set(r, { region: r, tx, prev: null, next: null, inLru: false });
          tx.live += 1;
        }
      }
      assert.ok(tx.live > 0);
    }
    for (const op of txOps) {
      let need = 0;
      for (let r = op.first; r <= op.last; r++) need = Math.max(need, this.cover.get(r)!.tx.endLsn);
      op.needLsn = need;
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Step 3: write the volume and enqueue the update.

  /**
   * Step 3 (H9). Issues the op's volume I/O once its log record is durable and no older op that
   * overlaps it is still doing volume I/O, so overlapping writes reach the volume in id order.
   * A resync read is such an op too, so writes that arrive during it wait behind it (H8).
   */
  private issueIfFirst(op: Op): void {
    assert.equal(op.state, 'order');
    for (let r = op.first; r <= op.last; r++) {
      for (const other of this.regionOps.get(r)!) {
        if (other === op) break;
        if (other.offset < op.offset + op.length && op.offset < other.offset + other.length) return;
      }
    }
    assert.ok(op.needLsn <= this.logDurable, 'I2: log record durable before the volume write');
    op.state = 'io';
    if (op.resync) {
      this.emit({
        type: 'readRegion',
        updateId: op.id,
        region: op.first,
        offset: op.offset,
        length: op.length,
      });
    } else {
      this.emit({
        type: 'writeVolume',
        updateId: op.id,
        txId: op.tx!.id,
        index: op.index,
        offset: op.offset,
        length: op.length,
        kind: op.kind,
      });
    }
  }

  /** The op's volume I/O is done: unblock younger overlapping ops and queue it for sending. */
  private finishVolumeIo(op: Op): void {
    op.state = 'ready';
    const woken: Op[] = [];
    for (let r = op.first; r <= op.last; r++) {
      const list = this.regionOps.get(r)!;
      const i = list.indexOf(op);
      assert.ok(i >= 0);
      list.splice(i, 1);
      if (list.length === 0) this.regionOps.delete(r);
      else for (const o of list) if (o.state === 'order' && !woken.includes(o)) woken.push(o);
    }
    woken.sort((a, b) => a.id - b.id);
    for (const o of woken) if (o.state === 'order') this.issueIfFirst(o);
  }

  /**
   * Step 3, the stream (H10): releases ready updates in id order, so the stream carries
   * increasing ids and a cumulative ack never covers an id the replica did not get. Without a
   * connection an update is dropped: its regions stay dirty for the next resync.
   */
  private releaseInOrder(): void {
    this.releaseBarriers();
    for (;;) {
      const op = this.ops.get(this.nextReleaseId);
      if (op === undefined || op.state !== 'ready') return;
      const source: UpdateSource = op.resync
        ? { type: 'resync', region: op.first }
        : { type: 'write', txId: op.tx!.id, index: op.index };
      if (this.connected) {
        if (op.id >= this.durableIdLimit) return; // H14: wait until its reservation is durable
        op.state = 'sent';
        op.sentAtMs = this.nowMs;
        this.lastSentId = op.id;
        this.sentQueue.push(op);
        if (this.syncMode && op.tx !== null) this.unwrittenQueue.push(op);
        this.emit({
          type: 'send',
          updateId: op.id,
          offset: op.offset,
          length: op.length,
          kind: op.kind,
          source,
        });
      } else {
        this.retire(op, true);
        this.emit({ type: 'dropUpdate', updateId: op.id, source });
      }
      this.nextReleaseId += 1;
      this.releaseBarriers();
    }
  }

  /** Barriers go on the stream right after the last update issued before them (H13). */
  private releaseBarriers(): void {
    for (;;) {
      const b = this.barriers.peek();
      if (b === undefined || b.afterUpdateId >= this.nextReleaseId) return;
      this.barriers.shift();
      if (this.connected) this.emit({ type: 'sendBarrier', ...b });
    }
  }

  private pushBarrier(kind: BarrierKind, afterUpdateId: number): void {
    this.barriers.push({ barrierId: this.nextBarrierId, afterUpdateId, kind });
    this.nextBarrierId += 1;
  }

  /**
   * Registers a FUA transaction or a FLUSH that needs every volume write finished so far to be
   * durable; returns the id of the volume sync that does it, or 0 when they already are.
   */
  private waitForVolumeSync(tx: ClientTx | null, flushId: number): number {
    let need: number;
    if (this.volumeUnsynced.size > 0) need = this.volumeSyncId + 1;
    else if (this.volumeSyncing !== null) need = this.volumeSyncId;
    else return 0;
    this.syncWaiters.push({ need, tx, flushId });
    return need;
  }

  /** Completes a transaction once its writes are on the volume, durably with FUA, and settled in sync mode. */
  private maybeComplete(tx: ClientTx): void {
    if (tx.completed || tx.remaining > 0) return;
    if (tx.fua && this.volumeSyncDone < tx.syncNeeded) return;
    if (this.syncMode && (tx.fua ? tx.unsettled : tx.unwritten) > 0) return;
    tx.completed = true;
    this.emit({ type: 'complete', txId: tx.id });
  }

  private issueVolumeSync(): void {
    assert.equal(this.volumeSyncing, null);
    this.volumeSyncing = this.volumeUnsynced;
    this.volumeUnsynced = new Set();
    this.volumeSyncId += 1;
    this.lastVolumeSyncMs = this.nowMs;
    this.emit({ type: 'syncVolume', syncId: this.volumeSyncId });
  }

  /**
   * Volume durability: a volume sync for a FLUSH or FUA write waiting on one, or when clean
   * regions wait on one to leave an over-full window, when many regions are unsynced, or every
   * VOLUME_SYNC_INTERVAL_MS while clean regions wait.
   */
  private maybeSyncVolume(): void {
    if (this.volumeSyncing !== null) return;
    if (this.syncWaiters.peek()?.need === this.volumeSyncId + 1) {
      this.issueVolumeSync();
      return;
    }
    if (this.volumeUnsynced.size === 0) return;
    // A volume sync only serves clean regions waiting to leave the window (H15); syncing for
    // nothing would make every write pay for disk writeback, which the page cache otherwise hides.
    const waiting = this.evictWait.size > 0;
    const blocked = waiting && this.cover.size > this.config.activityWindowRegions;
    const due =
      blocked ||
      this.volumeUnsynced.size >= VOLUME_SYNC_REGIONS_MAX ||
      (waiting && this.nowMs >= this.lastVolumeSyncMs + VOLUME_SYNC_INTERVAL_MS);
    if (due) this.issueVolumeSync();
  }

  // ---------------------------------------------------------------------------------------------
  // Step 4: acks.

  /**
   * Step 4 (H3). A cumulative ack removes ids ≤ N, and only those, from the update sets; a
   * region whose set it emptied is reset unless it is dirty beyond its updates (H12).
   */
  private processAck(ackId: number): void {
    if (ackId <= this.ackedId) return;
    this.ackedId = ackId;
    while ((this.sentQueue.peek()?.id ?? Number.POSITIVE_INFINITY) <= ackId) {
      this.retire(this.sentQueue.shift()!, false);
    }
    while ((this.unwrittenQueue.peek()?.id ?? Number.POSITIVE_INFINITY) <= ackId) this.unwrittenQueue.shift();
    this.releaseReplicaFlushes(false);
    this.ackTimeoutFired = false;
  }

  /**
   * Takes an update out of its regions' update sets: acked (it reached the replica durably) or
   * lost (it never will). Resets a region only when an ack removed its last id and nothing else
   * made it dirty (I3); then the region may leave the activity window.
   */
  private retire(op: Op, lost: boolean): void {
    if (op.tx !== null) {
      op.tx.unsettled -= 1;
      // Durable on the replica (or lost, never to be waited for) is written too.
      this.markWritten(op);
      this.maybeComplete(op.tx);
    }
    for (let r = op.first; r <= op.last; r++) {
      const entry = this.pending.get(r)!;
      entry.count -= 1;
      if (lost) entry.stale = true;
      if (entry.count > 0) continue;
      this.pending.delete(r);
      if (!entry.stale) {
        this.indicator.reset(r);
        const c = this.cover.get(r);
        // Clean: may leave the window (H11) once its volume writes are durable too.
        if (c !== undefined) {
          if (this.volumeUnsynced.has(r) || this.volumeSyncing?.has(r)) this.evictWait.add(r);
          else this.lruPush(c);
        }
      } else if (this.connected) {
        this.resyncRetry.add(r); // still dirty with nothing in flight: resync it
      }
    }
    this.inflightBytes -= op.bytes;
    assert.ok(this.inflightBytes >= 0);
    this.ops.delete(op.id);
  }

  /**
   * Step 4, the window (H11): evicts the least recently used clean regions while the window is
   * over size. A begin record with no region left in the window is complete.
   */
  private evictWindow(): void {
    while (this.cover.size > this.config.activityWindowRegions && this.lruHead !== null) {
      const c = this.lruHead;
      this.lruRemove(c);
      assert.ok(
        !this.indicator.test(c.region) && !this.pending.has(c.region),
        'H11: only clean regions leave',
      );
      this.cover.delete(c.region);
      c.tx.live -= 1;
      if (c.tx.live === 0) this.completeLogTx(c.tx);
    }
    if (this.checkpoint === null && this.cover.size > this.config.activityWindowRegions + WINDOW_PINNED_MAX) {
      // Too many dirty regions pinned (a slow or absent secondary): fold them into the bitmap.
      this.startCheckpoint();
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Step 5: complete.

  /** Step 5. A record that covers nothing gets a completion record (a hint, no sync: H4). */
  private completeLogTx(tx: LogTx): void {
    assert.ok(!tx.done && tx.live === 0);
    tx.done = true;
    this.completions.push(tx.lsn);
  }

  private flushCompletions(): void {
    while (this.completions.length > 0) {
      const begins = this.completions.splice(0, RECORD_COMPLETES_MAX);
      // Hints only: with no room they are skipped; the space comes back when the tail advances.
      if (this.logSpace() >= completeRecordBytes(begins.length)) {
        this.appendRecord({ type: 'complete', lsn: this.logHead, idLimit: this.idLimit, begins }, false);
      }
    }
  }

  /**
   * Step 5, space. The log tail may move past every record that is complete or older than the
   * persisted bitmap's covered position; nothing else.
   */
  private freeLogSpace(): void {
    for (;;) {
      const tx = this.txQueue.peek();
      if (tx === undefined || !(tx.done || tx.endLsn <= this.bitmapCoveredLsn)) break;
      this.txQueue.shift();
    }
    const freeable = this.txQueue.peek()?.lsn ?? this.logHead;
    assert.ok(freeable >= this.logFreed);
    const batch = this.config.logCapacity / LOG_FREE_FRACTION;
    if (freeable > this.logFreed && (this.spaceWanted || freeable - this.logFreed >= batch)) {
      this.logFreed = freeable;
      this.emit({ type: 'freeLog', upToLsn: freeable, idLimit: this.idLimit });
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Step 6: checkpoint (persist the bitmap).

  /**
   * Step 6. Snapshots the indicator map for the bitmap file; the snapshot covers every record
   * before the current log head. H1: from this moment no record before the head covers anything,
   * so the next write to any of their regions appends a new record (the old ones will be freed).
   */
  private startCheckpoint(): void {
    if (this.checkpoint !== null) {
      this.checkpointAgain = true;
      return;
    }
    const cp: Checkpoint = { id: this.nextCheckpointId, coveredLsn: this.logHead, idLimit: this.idLimit };
    this.nextCheckpointId += 1;
    this.checkpoint = cp;
    this.cover.clear();
    this.lruHead = null;
    this.lruTail = null;
    // Regions in evictWait keep waiting for their volume sync: once it is done they are clean
    // for the next bitmap (defect: forgetting them made every later bitmap mark them dirty).
    for (const tx of this.txQueue) tx.live = 0;
    // A clean region whose volume writes may not be durable yet is dirty for the bitmap: a
    // power loss could take them back off the volume while the replica keeps them.
    // The map as it is now, read piece by piece while it goes on changing (no 30 MiB snapshot).
    // (No spread into push: these sets can hold more regions than a call takes arguments.)
    const extra: number[] = [];
    for (const set of [this.volumeUnsynced, this.volumeSyncing])
      if (set !== null) for (const r of set) extra.push(r);
    this.emit({
      type: 'persistBitmap',
      checkpointId: cp.id,
      bitmap: this.indicator.freeze(extra),
      coveredLsn: cp.coveredLsn,
      idLimit: cp.idLimit,
    });
  }

  /** Step 6, done: the records the bitmap covers are free; a checkpoint record notes it. */
  private finishCheckpoint(cp: Checkpoint): void {
    assert.ok(cp.coveredLsn >= this.bitmapCoveredLsn);
    this.bitmapCoveredLsn = cp.coveredLsn;
    this.durableIdLimit = Math.max(this.durableIdLimit, cp.idLimit);
    if (this.logSpace() >= CHECKPOINT_RECORD_BYTES) {
      this.appendRecord(
        {
          type: 'checkpoint',
          lsn: this.logHead,
          idLimit: this.idLimit,
          checkpointId: cp.id,
          coveredLsn: cp.coveredLsn,
        },
        false,
      );
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Step 7: resync.

  /**
   * Step 7 (H8, I4). Starts resyncs of dirty regions in region order while the in-flight window
   * allows. A region is resynced only when it has no update in flight; reading it, giving it an
   * id and queuing it are one step, and writes to it that come later wait behind the read.
   */
  private pumpResync(): void {
    if (!this.connected || !this.volumeTrusted) return; // H17: no read before the volume is synced
    while (this.resyncOps < RESYNC_OPS_MAX) {
      const region = this.nextResyncCandidate();
      if (region === -1) break;
      const offset = region * this.config.regionSize;
      const length = Math.min(this.config.regionSize, this.config.volumeSize - offset);
      if (this.inflightBytes > 0 && this.inflightBytes + length > this.config.inflightBytesMax) break;
      if (!this.reserveIds(1, 0)) {
        // No log room to reserve ids: fold the log into the bitmap rather than stall the resync.
        if (this.checkpoint === null) this.startCheckpoint();
        break;
      }
      // A retry does not move the cursor: regions between it and the cursor still need a pass.
      if (!this.resyncRetry.delete(region)) this.resyncCursor = region + 1;
      const op: Op = {
        id: this.nextId,
        tx: null,
        index: 0,
        resync: true,
        kind: 'data',
        offset,
        length,
        first: region,
        last: region,
        needLsn: 0,
        state: 'order',
        bytes: length,
        sentAtMs: 0,
        written: false,
      };
      this.nextId += 1;
      assert.ok(!this.regionOps.has(region), 'H8: no write in flight to a region being resynced');
      this.ops.set(op.id, op);
      this.markRegions(op);
      this.regionOps.set(region, [op]);
      this.inflightBytes += op.bytes;
      this.resyncOps += 1;
      this.issueIfFirst(op);
    }
  }

  /** The next dirty region with nothing in flight: retries first, then the cursor. */
  private nextResyncCandidate(): number {
    for (const r of this.resyncRetry) {
      if (this.indicator.test(r) && !this.pending.has(r)) return r;
      this.resyncRetry.delete(r);
    }
    if (!this.resyncing) return -1;
    for (;;) {
      const r = this.indicator.nextSet(this.resyncCursor);
      if (r === -1) {
        // Regions skipped because they had updates in flight come back through resyncRetry.
        this.resyncing = false;
        return -1;
      }
      if (!this.pending.has(r)) return r;
      this.resyncCursor = r + 1;
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Admission and the pump.

  /** Runs everything an event may have unblocked, in a fixed order. */
  private pump(): void {
    this.evictWindow();
    this.flushCompletions();
    this.freeLogSpace();
    this.admitTransactions();
    this.pumpResync();
    if (this.resyncEndPending && this.replicaCaughtUp()) {
      // The replica will be a state the volume had once it applies what is on the stream.
      this.resyncEndPending = false;
      this.pushBarrier('resyncEnd', this.nextId - 1);
    }
    this.releaseInOrder();
    this.flushCompletions();
    this.freeLogSpace();
    this.maybeSync();
    this.maybeSyncVolume();
  }

  /** Admits queued transactions in order while the in-flight window and the log have room. */
  private admitTransactions(): void {
    for (;;) {
      const tx = this.admitQueue.peek();
      if (tx === undefined) {
        this.spaceWanted = false;
        return;
      }
      if (this.inflightBytes > 0 && this.inflightBytes + tx.bytes > this.config.inflightBytesMax) return;
      const logBytes = beginRecordBytes(tx.writes.length) + LOG_RESYNC_RESERVE_BYTES;
      if (!this.reserveIds(tx.writes.length, logBytes)) {
        // Log full: free what is complete; if that is not enough, fold the log into the bitmap.
        this.spaceWanted = true;
        this.freeLogSpace();
        if (!this.reserveIds(tx.writes.length, logBytes)) {
          if (this.checkpoint === null) this.startCheckpoint();
          return;
        }
      }
      this.admitQueue.shift();
      this.admit(tx);
    }
  }

  private admit(tx: ClientTx): void {
    const txOps: Op[] = [];
    tx.writes.forEach((w, index) => {
      const op: Op = {
        id: this.nextId,
        tx,
        index,
        resync: false,
        kind: w.kind,
        offset: w.offset,
        length: w.length,
        first: Math.floor(w.offset / this.config.regionSize),
        last: Math.floor((w.offset + w.length - 1) / this.config.regionSize),
        needLsn: 0,
        state: 'log',
        bytes: updateBytes(w.kind, w.length),
        sentAtMs: 0,
        written: false,
      };
      this.nextId += 1;
      this.ops.set(op.id, op);
      this.inflightBytes += op.bytes;
      this.markRegions(op); // step 1 before step 2
      txOps.push(op);
    });
    this.logTransaction(txOps);
    // H16: a FUA write is a barrier on the stream right after it.
    if (tx.fua) this.pushBarrier('flush', txOps[txOps.length - 1].id);
    if (this.idLimit > this.idLimitAppended) {
      this.appendRecord({ type: 'reserve', lsn: this.logHead, idLimit: this.idLimit }, true);
    }
    for (const op of txOps) {
      for (let r = op.first; r <= op.last; r++) {
        const list = this.regionOps.get(r);
        if (list === undefined) this.regionOps.set(r, [op]);
        else list.push(op);
      }
    }
    for (const op of txOps) {
      if (op.needLsn <= this.logDurable) {
        op.state = 'order';
        this.issueIfFirst(op);
      } else {
        this.logWaiters.push(op);
      }
    }
  }

  /**
   * Makes room for `count` more update ids below the id limit, raising it by a block when it
   * runs low (H14). Needs `logBytes` of log space besides a reserve record; false if the log
   * has no room (nothing changes then).
   */
  private reserveIds(count: number, logBytes: number): boolean {
    const raise = this.nextId + count + ID_RESERVE_LOW_WATER > this.idLimit;
    const need = logBytes + (raise || this.idLimit > this.idLimitAppended ? RESERVE_RECORD_BYTES : 0);
    if (this.logSpace() < need) return false;
    if (raise) this.idLimit = this.nextId + count + ID_RESERVE_BLOCK;
    if (logBytes === 0 && this.idLimit > this.idLimitAppended) {
      this.appendRecord({ type: 'reserve', lsn: this.logHead, idLimit: this.idLimit }, true);
    }
    return true;
  }

  // ---------------------------------------------------------------------------------------------
  // Log plumbing.

  private logSpace(): number {
    return this.config.logCapacity - (this.logHead - this.logFreed);
  }

  /** Appends a record at the head; `durable` records make the next sync necessary. */
  private appendRecord(record: LogRecord, durable: boolean): void {
    assert.equal(record.lsn, this.logHead);
    const size = recordBytes(record);
    assert.ok(size <= this.logSpace(), 'log overrun');
    this.logHead += size;
    if (record.idLimit > this.idLimitAppended) {
      this.idLimitAppended = record.idLimit;
      this.limitWaits.push({ limit: record.idLimit, endLsn: this.logHead });
      durable = true;
    }
    if (durable) this.syncWanted = this.logHead;
    this.emit({ type: 'appendLog', record });
  }

  /** Group commit: one sync at a time; records appended meanwhile go with the next one. */
  private maybeSync(): void {
    if (this.syncInFlight !== null || this.syncWanted <= this.logDurable) return;
    this.syncInFlight = this.logHead;
    this.emit({ type: 'syncLog', throughLsn: this.logHead });
  }

  // ---------------------------------------------------------------------------------------------
  // Helpers.

  private emit(action: Action): void {
    this.actions.push(action);
  }

  private advanceTime(now: number): void {
    assert.ok(Number.isFinite(now), 'now must be a number');
    assert.ok(now >= this.nowMs, 'time never goes back');
    this.nowMs = now;
  }

  private validateWrite(w: WriteRequest): void {
    const ok =
      Number.isSafeInteger(w.offset) &&
      Number.isSafeInteger(w.length) &&
      w.offset >= 0 &&
      w.length > 0 &&
      w.length <= WRITE_BYTES_MAX &&
      w.offset + w.length <= this.config.volumeSize &&
      (w.kind === 'data' || w.kind === 'zero' || w.kind === 'trim');
    if (!ok) {
      throw new VolrepError(
        'VOLREP_ERR_REQUEST',
        `bad write: offset ${w.offset}, length ${w.length}, kind ${String(w.kind)} (volume ${this.config.volumeSize} bytes, at most ${WRITE_BYTES_MAX} per write)`,
      );
    }
  }

  private lruPush(c: Cover): void {
    if (c.inLru) return;
    c.inLru = true;
    c.prev = this.lruTail;
    c.next = null;
    if (this.lruTail) this.lruTail.next = c;
    else this.lruHead = c;
    this.lruTail = c;
  }

  private lruRemove(c: Cover): void {
    assert.ok(c.inLru);
    if (c.prev) c.prev.next = c.next;
    else this.lruHead = c.next;
    if (c.next) c.next.prev = c.prev;
    else this.lruTail = c.prev;
    c.prev = null;
    c.next = null;
    c.inLru = false;
  }
}

function updateBytes(kind: WriteKind, length: number): number {
  return kind === 'data' ? length : UPDATE_OVERHEAD_BYTES;
}

/** Sorts ranges and merges overlapping or adjacent ones. */
function mergeRanges(ranges: Array<[number, number]>): Array<[number, number]> {
  const sorted = [...ranges].sort((a, b) => a[0] - b[0]);
  const out: Array<[number, number]> = [];
  for (const [first, count] of sorted) {
    const prev = out[out.length - 1];
    if (prev !== undefined && first <= prev[0] + prev[1]) {
      prev[1] = Math.max(prev[1], first + count - prev[0]);
    } else {
      out.push([first, count]);
    }
  }
  return out;
}

function validateConfig(c: EngineConfig): void {
  const bad = (what: string) => new VolrepError('VOLREP_ERR_CONFIG', what);
  const pow2 = (n: number) => Number.isSafeInteger(n) && n > 0 && 2 ** Math.round(Math.log2(n)) === n;
  if (!pow2(c.regionSize) || c.regionSize < REGION_SIZE_MIN || c.regionSize > REGION_SIZE_MAX) {
    throw bad(
      `region size ${c.regionSize} must be a power of two from ${REGION_SIZE_MIN} to ${REGION_SIZE_MAX}`,
    );
  }
  if (!Number.isSafeInteger(c.volumeSize) || c.volumeSize <= 0) throw bad(`bad volume size ${c.volumeSize}`);
  if (Math.ceil(c.volumeSize / c.regionSize) > 2 ** 32) throw bad('more than 2^32 regions');
  const txWritesMax = c.txWritesMax ?? TX_WRITES_MAX;
  if (!Number.isSafeInteger(txWritesMax) || txWritesMax < 1 || txWritesMax > TX_WRITES_MAX) {
    throw bad(`writes per transaction ${txWritesMax} must be 1 to ${TX_WRITES_MAX}`);
  }
  const capacityMin = logCapacityMin(txWritesMax);
  if (!Number.isSafeInteger(c.logCapacity) || c.logCapacity < capacityMin || c.logCapacity % 8 !== 0) {
    throw bad(`log capacity ${c.logCapacity} must be a multiple of 8, at least ${capacityMin}`);
  }
  if (!Number.isSafeInteger(c.activityWindowRegions) || c.activityWindowRegions < 1) {
    throw bad(`activity window ${c.activityWindowRegions} must be at least 1 region`);
  }
  if (!Number.isSafeInteger(c.inflightBytesMax) || c.inflightBytesMax < 1) {
    throw bad(`in-flight window ${c.inflightBytesMax} must be positive`);
  }
  if (!(c.ackTimeoutMs > 0)) throw bad(`ack timeout ${c.ackTimeoutMs} must be positive`);
}
