/**
 * The secondary's ordered applier (DESIGN.md I5, H5, H13, H14).
 *
 * Updates are applied to the replica in id order: a write starts only after every write it
 * overlaps, and the applied id is the last update before the oldest write still running. Writes
 * that do not overlap run side by side (at most WRITES_IN_FLIGHT_MAX, adjacent ones joined into
 * one), as a disk with a queue runs them: between two barriers the order of non-overlapping
 * writes changes neither the content nor what a barrier promises (I5). Many updates share one
 * sync, which acks the highest id then on disk — so an ack always means durable (H5). Nobody waits on a sync
 * except at a barrier (a client's FLUSH or FUA write, a resync mark) or when the primary's
 * in-flight window fills, so once the applier has caught up it syncs at once only when a barrier
 * or enough unsynced data asks for it, and otherwise within SYNC_DELAY_MS: at one write in
 * flight that is one sync per many writes, not one per write.
 *
 * The record of that id (the replica-state file) follows in the background, one write at a time,
 * always for an id whose data was synced first: it may lag the data, never run ahead of it (H14);
 * a lagging record only makes a restarted replica report an older id than it holds (the primary
 * keeps the higher one it was acked). So a batch costs one fdatasync on the critical path, not
 * two. A change of consistency or generation is recorded before it is acked. A barrier (the
 * primary's FLUSH) is a sync point: nothing after it is written before everything before it is
 * durable (H13). During a resync the replica is durably marked inconsistent before the first
 * resync byte lands, and consistent again only after the last one is durable.
 */
import type { BlockDevice, Released } from '../io/block-device.js';
import type { Clock, Timer } from '../io/clock.js';
import type { BornZeroMark } from '../volume/born-zero.js';
import { endResync, type Generations } from './generations.js';
import type { UpdateHeader } from './messages.js';

export interface ReplicaState {
  /** Highest update id whose data is durable on the replica. */
  lastAppliedUpdate: number;
  /** False while a resync is in progress (the replica is not a state the primary ever had). */
  consistent: boolean;
  /** The generation of the replica's data (DESIGN.md §7): the sender's, taken when a resync begins. */
  generations: Generations;
  /**
   * Written by `volrep create` only, for a replica file it made (all zeros; trusted only while
   * the file is as created, src/volume/born-zero.ts): the applier's first record drops it.
   */
  bornZero?: BornZeroMark;
}

export interface ReplicaStateStore {
  write(state: ReplicaState): Promise<void>;
}

/**
 * How long written data may wait for its sync when nothing waits on it. It delays only the
 * durable ack (so the primary's clean marks, and in async mode what a failover keeps), never a
 * client: FLUSH and FUA reach the applier as barriers, which sync at once.
 */
export const SYNC_DELAY_MS = 5;
/**
 * Unsynced bytes or updates at which the applier syncs without waiting: the primary's window and
 * a resync wait on the acks. Bytes: at most a quarter of the primary's window (told in its hello).
 */
export const SYNC_NOW_BYTES = 1024 * 1024;
export const SYNC_NOW_UPDATES = 64;
/**
 * Unsynced bytes at which the applier syncs while it has not caught up (a full sync keeps it
 * busy for seconds): far more than SYNC_NOW_BYTES, since each sync slows the writes beside it,
 * but at most a quarter of the primary's window, so acks keep its window open.
 */
export const SYNC_BEHIND_BYTES = 16 * 1024 * 1024;
/** The largest replica write made of adjacent queued updates (see `coalesce`). */
export const COALESCE_BYTES_MAX = 1024 * 1024;
/**
 * Replica writes at once (non-overlapping). A write into the page cache runs at the speed of one
 * core copying (and, for a new file, the kernel providing its pages); a few side by side use the
 * threadpool like a disk with a queue. Below libuv's four threads, so a sync always finds one.
 */
export const WRITES_IN_FLIGHT_MAX = 3;

/** One replica write: an update, or several adjacent ones joined (see `coalesce`). */
interface ReplicaWrite {
  update: UpdateHeader;
  data: Buffer[];
  /** Updates it carries. */
  count: number;
  /** What to tell once the write reads `data` no more. */
  released: Released[];
}

interface WriteInFlight {
  /** The highest update id the write carries. */
  id: number;
  offset: number;
  length: number;
  /** Bytes of data it writes (zeroes and trims count none: they mostly write nothing). */
  dataBytes: number;
  /** Updates it carries (joined ones). */
  count: number;
  done: boolean;
}

export interface ApplierOptions {
  clock: Clock;
  /** Overrides SYNC_DELAY_MS; 0 syncs as soon as the applier has caught up. */
  syncDelayMs?: number;
}

export type ApplierOp =
  /** A data update's `released` (if any): called once its replica write reads `data` no more (BlockDevice's rule). */
  | { kind: 'update'; update: UpdateHeader; data: Buffer[]; released?: Released }
  | { kind: 'barrier' }
  | { kind: 'resyncBegin' }
  | { kind: 'resyncEnd' };

export class Applier {
  /** What is durable on the replica (data synced; consistency and generation recorded): what is acked. */
  private durable: ReplicaState;
  /** What the replica-state file holds durably (its applied id may lag `durable`'s). */
  private recordedState: ReplicaState;
  /** Record writes, one at a time and in order; the newest state still to record, if any. */
  private recordWrite: Promise<void> = Promise.resolve();
  private recordPending: ReplicaState | undefined;
  private consistentWanted: boolean;
  private generationsWanted: Generations;
  /** Highest id written to the replica (durable or not) and highest id accepted into the queue. */
  private appliedId: number;
  private acceptedId: number;
  private readonly queue: ApplierOp[] = [];
  private queuedBytesCount = 0;
  /** A sync point (barrier, resync mark) runs: nothing after it starts. */
  private blocked = false;
  /** Replica writes issued and not all done, oldest first (at most WRITES_IN_FLIGHT_MAX). */
  private writes: WriteInFlight[] = [];
  /** The update whose write is being issued (0: none), for checks that watch the device. */
  private applying = 0;
  private syncRunning: Promise<void> | undefined;
  private syncWanted = false;
  /** What was written since the last sync began, and the timer that syncs it if nothing else does. */
  private unsyncedBytes = 0;
  private unsyncedUpdates = 0;
  private syncTimer: Timer | undefined;
  private readonly syncDelayMs: number;
  private syncNowBytes = SYNC_NOW_BYTES;
  private syncBehindBytes = SYNC_BEHIND_BYTES;
  private failure: Error | undefined;
  private idleWaiters: (() => void)[] = [];
  /** Called each time the durable state changes (the shell acks it to the primary). */
  onDurable: (state: ReplicaState) => void = () => {};
  onFailure: (err: Error) => void = () => {};
  /** Called when the queue has drained below what was queued (the shell resumes reading). */
  onProgress: () => void = () => {};
  /**
   * Called when the applier has caught up with what arrived, with the highest id written to the
   * replica (not yet durable: the batch's sync starts now); sync mode completes writes on it.
   */
  onWritten: (id: number) => void = () => {};
  private writtenReported: number;

  constructor(
    private readonly device: BlockDevice,
    private readonly store: ReplicaStateStore,
    initial: ReplicaState,
    private readonly opts: ApplierOptions,
  ) {
    this.syncDelayMs = opts.syncDelayMs ?? SYNC_DELAY_MS;
    this.durable = { ...initial };
    this.recordedState = { ...initial };
    this.consistentWanted = initial.consistent;
    this.generationsWanted = initial.generations;
    this.appliedId = initial.lastAppliedUpdate;
    this.acceptedId = initial.lastAppliedUpdate;
    this.writtenReported = initial.lastAppliedUpdate;
  }

  get state(): ReplicaState {
    return { ...this.durable };
  }

  /** Whether everything wanted (ids, consistency, generation) is durable and acked. */
  private synced(): boolean {
    return (
      this.appliedId === this.durable.lastAppliedUpdate &&
      this.consistentWanted === this.durable.consistent &&
      this.generationsWanted === this.durable.generations
    );
  }

  /** Whether the replica-state file has caught up with what is durable. */
  private recorded(): boolean {
    return (
      this.recordPending === undefined &&
      this.recordedState.lastAppliedUpdate === this.durable.lastAppliedUpdate &&
      this.recordedState.consistent === this.durable.consistent &&
      this.recordedState.generations === this.durable.generations
    );
  }

  get queuedBytes(): number {
    return this.queuedBytesCount;
  }

  /** Highest update id written to the replica, durable or not. */
  get writtenId(): number {
    return this.appliedId;
  }

  /** The update whose replica write is being issued now (0: none), for checks that tag device writes. */
  get applyingId(): number {
    return this.applying;
  }

  get failed(): Error | undefined {
    return this.failure;
  }

  /**
   * Accepts the next op from the stream. Returns a reason if it breaks the stream's rules (the
   * caller then drops the connection); the op is not applied in that case.
   */
  push(op: ApplierOp): string | undefined {
    if (this.failure) return `replica failed: ${this.failure.message}`;
    if (op.kind === 'update') {
      const { id, offset, length } = op.update;
      if (id <= this.acceptedId) return `update id ${id} is not above the last one (${this.acceptedId})`;
      if (offset + length > this.device.size) return `update ${id} extends beyond the end of the replica`;
      this.acceptedId = id;
      if (op.update.kind === 'data') this.queuedBytesCount += length;
    }
    this.queue.push(op);
    this.pump();
    return undefined;
  }

  /**
   * A resync is about to begin (the handshake): record durably that the replica takes these
   * generations and is inconsistent. Call only while idle; resolves once it is durable. For a full
   * sync (`fromZero`) the ids applied so far are another log's: accepted ids start again at 0.
   */
  recordResyncStart(generations: Generations, fromZero = false): Promise<void> {
    if (fromZero) {
      this.appliedId = 0;
      this.acceptedId = 0;
      this.writtenReported = 0;
    }
    this.generationsWanted = generations;
    this.consistentWanted = false;
    this.requestSync();
    return this.whenIdle();
  }

  /** The current primary's in-flight window (undefined: it did not say): never let it fill up unsynced. */
  peerWindow(windowBytes: number | undefined): void {
    const quarter = windowBytes === undefined ? undefined : Math.max(1, Math.floor(windowBytes / 4));
    this.syncNowBytes = Math.min(SYNC_NOW_BYTES, quarter ?? SYNC_NOW_BYTES);
    this.syncBehindBytes = Math.min(SYNC_BEHIND_BYTES, quarter ?? SYNC_BEHIND_BYTES);
  }

  /** Resolves when everything accepted so far is applied and durable (or the applier failed). */
  whenIdle(): Promise<void> {
    if (this.isIdle()) return Promise.resolve();
    this.syncSoon(true); // somebody waits: do not delay the sync
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  private isIdle(): boolean {
    return (
      this.failure !== undefined ||
      (this.queue.length === 0 &&
        !this.blocked &&
        this.writes.length === 0 &&
        this.syncRunning === undefined &&
        this.synced() &&
        this.recorded())
    );
  }

  private pump(): void {
    while (!this.blocked && this.failure === undefined && this.queue.length > 0) {
      const op = this.queue[0];
      if (op.kind === 'update') {
        // Writes run side by side only where they do not overlap: the replica ends as in id order.
        if (this.writes.length >= WRITES_IN_FLIGHT_MAX || this.overlapsWriteInFlight(op.update)) break;
        this.queue.shift();
        this.applyUpdate(this.coalesce(op));
        continue;
      }
      // Barrier, and both resync marks: a sync point, once every write before it is done.
      // Nothing after it is written until everything before it (and the consistency mark) is
      // durable.
      if (this.writes.length > 0) break;
      this.queue.shift();
      if (op.kind === 'resyncBegin') this.consistentWanted = false;
      if (op.kind === 'resyncEnd') {
        this.consistentWanted = true;
        this.generationsWanted = endResync(this.generationsWanted);
      }
      this.blocked = true;
      this.syncAll().then(() => {
        this.blocked = false;
        this.pump();
      });
    }
    if (!this.blocked && this.queue.length === 0 && this.writes.length === 0) {
      if (this.appliedId > this.writtenReported && this.failure === undefined) {
        this.writtenReported = this.appliedId;
        this.onWritten(this.appliedId);
      }
      this.syncSoon(this.idleWaiters.length > 0);
    }
    this.notifyIfIdle();
  }

  private overlapsWriteInFlight(update: UpdateHeader): boolean {
    for (const w of this.writes)
      if (w.offset < update.offset + update.length && update.offset < w.offset + w.length) return true;
    return false;
  }

  /**
   * Joins the data updates queued right behind a data update that continue where it ends (a
   * resync pass, a large client write: one update per region) into one write of the replica, up
   * to COALESCE_BYTES_MAX: one system call, and off the event loop, instead of many. They are
   * consecutive ids and do not overlap, so the replica ends the same; `update` comes back as the
   * whole range under the last id, which is what an ack of the batch covers anyway.
   */
  private coalesce(op: ApplierOp & { kind: 'update' }): ReplicaWrite {
    const { update, data } = op;
    const released = op.released === undefined ? [] : [op.released];
    let count = 1;
    if (update.kind !== 'data') return { update, data, count, released };
    let joined = update;
    let buffers = data;
    for (;;) {
      const next = this.queue[0];
      if (next?.kind !== 'update' || next.update.kind !== 'data') break;
      if (next.update.offset !== joined.offset + joined.length) break;
      if (joined.length + next.update.length > COALESCE_BYTES_MAX) break;
      // Joined, it would run beside an older write of its range (found in review).
      if (this.overlapsWriteInFlight(next.update)) break;
      this.queue.shift();
      if (buffers === data) buffers = [...data];
      for (const b of next.data) buffers.push(b);
      if (next.released !== undefined) released.push(next.released);
      joined = { ...next.update, offset: joined.offset, length: joined.length + next.update.length };
      count += 1;
    }
    return { update: joined, data: buffers, count, released };
  }

  private applyUpdate(batch: ReplicaWrite): void {
    const { update, data } = batch;
    const write: WriteInFlight = {
      id: update.id,
      offset: update.offset,
      length: update.length,
      dataBytes: update.kind === 'data' ? update.length : 0,
      count: batch.count,
      done: false,
    };
    this.writes.push(write);
    let returned = false;
    const done = (err: Error | null) => {
      if (this.failure !== undefined) return;
      if (err) return this.fail(err);
      if (update.kind === 'data') this.queuedBytesCount -= update.length;
      write.done = true;
      // Applied: every update up to the oldest write still running (what the next sync covers).
      while (this.writes[0]?.done) {
        const applied = this.writes.shift()!;
        this.appliedId = applied.id;
        this.unsyncedBytes += applied.dataBytes;
        this.unsyncedUpdates += applied.count;
      }
      // Updates that keep coming never let the applier catch up: sync what is written anyway.
      if (this.unsyncedBytes >= this.syncBehindBytes) this.requestSync();
      this.onProgress();
      // Completed asynchronously: carry on from here. Synchronously: the pump loop carries on.
      if (returned) this.pump();
    };
    this.applying = update.id;
    const { released } = batch;
    const letGo =
      released.length === 0
        ? undefined
        : (reusable: boolean) => {
            for (const r of released) r(reusable);
          };
    if (update.kind === 'data') this.device.write(update.offset, data, update.length, false, done, letGo);
    else if (update.kind === 'zero') this.device.writeZeroes(update.offset, update.length, false, done);
    else this.device.trim(update.offset, update.length, false, done);
    this.applying = 0;
    returned = true;
  }

  /**
   * The applier has caught up: syncs now when asked to, or when the unsynced data is large enough
   * for the primary to wait on its ack; otherwise once SYNC_DELAY_MS has passed.
   */
  private syncSoon(now: boolean): void {
    if (this.synced()) return;
    const large = this.unsyncedBytes >= this.syncNowBytes || this.unsyncedUpdates >= SYNC_NOW_UPDATES;
    if (now || large || this.syncDelayMs === 0) {
      this.requestSync();
      return;
    }
    this.syncTimer ??= this.opts.clock.setTimer(this.opts.clock.now() + this.syncDelayMs, () => {
      this.syncTimer = undefined;
      if (this.failure === undefined) this.requestSync();
    });
  }

  /** Starts a batch sync if something is not durable yet; batches everything applied by then. */
  private requestSync(): void {
    this.syncTimer?.cancel();
    this.syncTimer = undefined;
    if (this.syncRunning) {
      this.syncWanted = true;
      return;
    }
    if (this.synced()) return;
    this.syncRunning = this.syncOnce().finally(() => {
      this.syncRunning = undefined;
      if (this.syncWanted) {
        this.syncWanted = false;
        this.requestSync();
      }
      this.notifyIfIdle();
    });
  }

  /** Waits until everything applied so far is durable, starting syncs as needed. */
  private async syncAll(): Promise<void> {
    while (this.failure === undefined) {
      if (this.syncRunning) {
        await this.syncRunning;
        continue;
      }
      if (this.synced()) return;
      this.requestSync();
    }
  }

  private async syncOnce(): Promise<void> {
    this.unsyncedBytes = 0;
    this.unsyncedUpdates = 0;
    const target: ReplicaState = {
      lastAppliedUpdate: this.appliedId,
      consistent: this.consistentWanted,
      generations: this.generationsWanted,
    };
    // Only the applied id moved: the record may follow after the ack.
    const progressOnly =
      target.consistent === this.durable.consistent && target.generations === this.durable.generations;
    try {
      // Data first, then the record that says it is there (H14).
      await new Promise<void>((resolve, reject) =>
        this.device.flush((err) => (err ? reject(err) : resolve())),
      );
      const record = this.record(target);
      if (!progressOnly) await record;
    } catch (err) {
      this.fail(err as Error);
      return;
    }
    if (this.failure) return;
    // The ack carries the consistency mark too: the primary learns a resync's end from the
    // state that made it durable, never from an earlier batch (defect: it used to guess).
    const changed =
      target.lastAppliedUpdate > this.durable.lastAppliedUpdate ||
      target.consistent !== this.durable.consistent ||
      target.generations !== this.durable.generations;
    this.durable = target;
    if (changed) this.onDurable({ ...target });
  }

  /**
   * Records `state` (whose data is durable) after the record writes before it; writes that queue
   * up behind a running one collapse into one, for the newest state.
   */
  private record(state: ReplicaState): Promise<void> {
    const queued = this.recordPending !== undefined;
    this.recordPending = state;
    if (queued) return this.recordWrite;
    const write = this.recordWrite.then(async () => {
      const next = this.recordPending!;
      this.recordPending = undefined;
      await this.store.write(next);
      this.recordedState = next;
      this.notifyIfIdle();
    });
    this.recordWrite = write.catch((err: Error) => this.fail(err));
    return write;
  }

  private fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    this.syncTimer?.cancel();
    this.syncTimer = undefined;
    this.blocked = false;
    this.queue.length = 0;
    this.writes = [];
    this.onFailure(err);
    this.notifyIfIdle();
  }

  private notifyIfIdle(): void {
    if (this.idleWaiters.length === 0 || !this.isIdle()) return;
    for (const resolve of this.idleWaiters.splice(0)) resolve();
  }
}
