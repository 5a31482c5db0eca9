/**
 * The primary node: the engine core and, with a peer, the replication session, run over the
 * storage, transport and clock it is given. The daemon gives it node:fs files, TCP and the
 * system clock; the simulator gives it simulated ones. This is the only place that performs
 * their actions, so the real primary and the simulated one are the same code.
 *
 * Dev notes. Every input (a client request, an I/O completion, connection bytes, the timer)
 * goes into the engine or the session synchronously, then `pump()` performs the actions of both
 * until neither has any: engine actions that concern the link go to the session, session
 * commands to the engine go back. I/O completes later (or synchronously: small page-cache
 * writes do) and comes back as the next input. A failed log, bitmap or volume operation is
 * fatal: the durable state can no longer be trusted, so every pending request fails and the
 * node stops (the owner is told through `onFailure`).
 */
import { randomBytes } from 'node:crypto';
import type { Action, EngineConfig, TransactionOptions, WriteKind, WriteRequest } from '../core/engine.js';
import { Engine } from '../core/engine.js';
import { VolrepError } from '../errors.js';
import type { BlockDevice, Done, Released } from '../io/block-device.js';
import type { BlockFile } from '../io/block-file.js';
import type { Clock, Timer } from '../io/clock.js';
import { SlotFile } from '../io/slot-file.js';
import type { Connection, Dialer } from '../io/transport.js';
import type { BitmapFile } from '../log/bitmap-file.js';
import type { LogFile } from '../log/log-file.js';
import { type RecoveryReport, recover } from '../log/recovery.js';
import {
  dropBase,
  type GenerationId,
  type Generations,
  type HandshakeOutcome,
  legacyGenerations,
  parseGenerations,
  startGeneration,
} from '../replication/generations.js';
import {
  type PairState,
  PrimarySession,
  type PrimarySessionAction,
  type PrimarySessionStatus,
} from '../replication/primary-session.js';
import { isAllZero } from '../util/zero.js';
import { type BornZeroMark, parseBornZeroMark } from '../volume/born-zero.js';

/** The files and the volume of a primary. */
export interface PrimaryStorage {
  log: BlockFile;
  bitmap: BlockFile;
  /** The pair's history (a slot file): whether a replica was ever consistent. */
  pairState: BlockFile;
  volume: BlockDevice;
}

export type PrimaryNodeConfig = Omit<EngineConfig, 'logCapacity'>;

export interface PrimaryLinkConfig {
  dialer: Dialer;
  hello: { volumeId: string; size: number; regionSize: number };
  /** Both volumes are known identical at the pair's birth: no initial full sync. */
  assumeClean: boolean;
}

/** The part of a pino logger the node uses. */
export interface NodeLogger {
  debug(obj: object, msg: string): void;
  info(obj: object, msg: string): void;
  warn(obj: object, msg: string): void;
  error(obj: object, msg: string): void;
}

export interface PrimaryNodeOptions {
  clock: Clock;
  logger: NodeLogger;
  /** Replicate to a secondary; without it the node runs standalone and every write stays dirty. */
  link?: PrimaryLinkConfig;
  /** The node stopped after an I/O failure (called once). */
  onFailure?: (err: Error) => void;
  /** New generation ids (random by default; the simulator's are seeded). */
  newGenerationId?: () => GenerationId;
  /** The volume's id, for the generation of metadata older than generations. */
  volumeId?: string;
  /** Whether the volume file is still as `volrep create` made it (all zeros); absent: never. */
  volumeAsCreated?: (mark: BornZeroMark) => boolean;
}

/** What the last handshake decided, for status: when, and the peer's generations then. */
export interface HandshakeReport {
  decision: HandshakeOutcome;
  atMs: number;
  peer: Generations | null;
  reason?: string;
}

export function randomGenerationId(): GenerationId {
  return randomBytes(8).toString('hex');
}

/** One write of a transaction: `data` for 'data' (its pieces, never joined), `length` otherwise. */
export interface NodeWrite {
  offset: number;
  kind: WriteKind;
  length: number;
  data?: readonly Uint8Array[];
}

/** Tallies of durable-state work and traffic, for metrics. */
export interface PrimaryCounters {
  logRecords: number;
  logSyncs: number;
  bitmapPersists: number;
  volumeSyncs: number;
  replicatedBytes: number;
  resyncBytes: number;
  /** Of resyncBytes: regions that read back all-zero and went as zero updates (no data). */
  resyncZeroBytes: number;
  acks: number;
}

export interface PrimaryNodeStatus {
  dirtyRegions: number;
  pendingUpdates: number;
  pendingBytes: number;
  log: { usedBytes: number; capacityBytes: number; activeTransactions: number };
  /** The last resync: regions dirty when it began, and resync bytes sent since. */
  resync: { active: boolean; startedAtMs: number; totalBytes: number; doneBytes: number };
  link?: PrimarySessionStatus;
  /** The current connection to the secondary: TLS or not, and its certificate's fingerprint. */
  connection?: { tls: boolean; fingerprint: string | null };
  generations: Generations;
  handshake: HandshakeReport | null;
}

interface PendingTx {
  data: Array<readonly Uint8Array[] | null>;
  lease: DataLease | undefined;
  done: Done;
}

/** An update's bytes, from its volume write (or resync read) until it is sent or dropped. */
interface HeldBytes {
  data: readonly Uint8Array[] | null;
  lease: DataLease | undefined;
}

/**
 * The caller's memory under a transaction's data, lent to the node until nothing here reads it:
 * two holds per data write, one until its volume write is done, one until its update is sent
 * (and the connection is done with the bytes) or dropped.
 */
class DataLease {
  private holds: number;
  private reusable = true;
  private settled = false;

  constructor(
    dataWrites: number,
    private readonly released: Released,
    private readonly live: Set<DataLease>,
  ) {
    this.holds = 2 * dataWrites;
    live.add(this);
    if (this.holds === 0) this.settle();
  }

  /** One hold ends; `reusable: false` if the memory may still be read by I/O nobody waits for. */
  drop(reusable = true): void {
    if (!reusable) this.reusable = false;
    this.holds -= 1;
    if (this.holds === 0) this.settle();
  }

  /** The node stopped: whatever still holds the memory is let go of now, never to be reused. */
  abandon(): void {
    this.reusable = false;
    this.settle();
  }

  private settle(): void {
    if (this.settled) return;
    this.settled = true;
    this.live.delete(this);
    this.released(this.reusable);
  }
}

export class PrimaryNode {
  readonly counters: PrimaryCounters = {
    logRecords: 0,
    logSyncs: 0,
    bitmapPersists: 0,
    volumeSyncs: 0,
    replicatedBytes: 0,
    resyncBytes: 0,
    resyncZeroBytes: 0,
    acks: 0,
  };
  private readonly txs = new Map<number, PendingTx>();
  private readonly flushes = new Map<number, Done>();
  /** Update bytes by id, from the volume write (or resync read) until send or drop. */
  private readonly buffers = new Map<number, HeldBytes>();
  /** Leases of the updates sent since the last transmit: let go once the connection is done with them. */
  private sentLeases: DataLease[] = [];
  /** Every lease not yet settled (a node that fails lets go of them all). */
  private readonly leases = new Set<DataLease>();
  private readonly session: PrimarySession | undefined;
  private connection: Connection | undefined;
  private timer: Timer | undefined;
  private timerAtMs = Number.POSITIVE_INFINITY;
  private pumping = false;
  private ioCount = 0;
  private idleWaiters: Array<() => void> = [];
  private pairStateWrite: Promise<void> = Promise.resolve();
  private pair: PairState;
  /** Writes held until a new generation is durable (the first write while not in step). */
  private heldWrites: Array<() => void> | undefined;
  private lastHandshake: HandshakeReport | null = null;
  private failure: Error | null = null;
  private closed = false;
  private resyncStart = { atMs: 0, regions: 0, resyncBytes: 0 };

  private constructor(
    readonly engine: Engine,
    private readonly log: LogFile,
    private readonly bitmap: BitmapFile,
    private readonly pairState: SlotFile<PairState>,
    pair: PairState,
    private readonly storage: PrimaryStorage,
    private readonly opts: PrimaryNodeOptions,
    readonly recovery: RecoveryReport,
  ) {
    this.pair = pair;
    if (opts.link) {
      this.session = new PrimarySession({
        hello: opts.link.hello,
        assumeClean: opts.link.assumeClean,
        replicaEverSynced: pair.replicaEverSynced,
        volumeBornZero:
          pair.volumeBornZero !== undefined && opts.volumeAsCreated?.(pair.volumeBornZero) === true,
        generations: () => this.pair.generations,
        silenceMsMax: engine.config.ackTimeoutMs,
        syncMode: engine.config.syncMode === true,
        windowBytes: engine.config.inflightBytesMax,
      });
    }
  }

  /**
   * Recovers the engine's state from the log and bitmap (a missing or unreadable one is refused
   * by the caller or here: never "clean", H18), then starts the engine and, with a link, the
   * session. The engine's first act is a volume sync (H17).
   */
  static async open(
    storage: PrimaryStorage,
    config: PrimaryNodeConfig,
    opts: PrimaryNodeOptions,
  ): Promise<PrimaryNode> {
    const regionCount = Math.ceil(config.volumeSize / config.regionSize);
    const r = await recover(storage.log, storage.bitmap, regionCount);
    const { slots, value } = await SlotFile.open(storage.pairState, 'pair-state', (v) =>
      validatePairState(v, opts.volumeId),
    );
    const engine = new Engine({ ...config, logCapacity: r.log.capacity }, r.state);
    const node = new PrimaryNode(engine, r.log, r.bitmap, slots, value, storage, opts, r.report);
    node.session?.start(opts.clock.now());
    node.pump();
    return node;
  }

  get failed(): Error | null {
    return this.failure;
  }

  /** Bytes of the log's record area. */
  get logCapacity(): number {
    return this.log.capacity;
  }

  /**
   * One transaction: `done` once every write is on the volume (durable with `fua`; in sync mode
   * while connected, also written by the secondary, and durable there with `fua`). Throws
   * VOLREP_ERR_REQUEST for a write the engine cannot take (out of range, too large), before
   * anything happens. `released` is called once in every case (before that throw too), when the
   * node reads the data no more: the volume writes are done and the updates sent or dropped —
   * often after `done`, since an update may go out after its write completed.
   */
  submit(writes: readonly NodeWrite[], options: TransactionOptions, done: Done, released?: Released): void {
    if (this.failure !== null || this.closed) {
      released?.(true);
      return done(this.failure ?? new VolrepError('VOLREP_ERR_STATE', 'the volume is closed'));
    }
    const requests: WriteRequest[] = writes.map((w) => ({
      offset: w.offset,
      length: w.length,
      kind: w.kind,
    }));
    try {
      this.engine.checkTransaction(requests);
    } catch (err) {
      released?.(true); // refused before anything read the data
      throw err;
    }
    // The first write while not in step with the secondary starts a generation of its own
    // (DESIGN.md §7), durable before any such write: held until then.
    if (this.heldWrites === undefined && this.pair.generations.base === null && !this.session?.inStep())
      this.startOwnGeneration();
    if (this.heldWrites !== undefined) {
      this.heldWrites.push(() => this.submit(writes, options, done, released));
      return;
    }
    const txId = this.engine.submitTransaction(requests, this.opts.clock.now(), options);
    let dataWrites = 0;
    for (const w of writes) if (w.kind === 'data') dataWrites++;
    this.txs.set(txId, {
      data: writes.map((w) => (w.kind === 'data' ? (w.data ?? []) : null)),
      lease: released && new DataLease(dataWrites, released, this.leases),
      done,
    });
    this.pump();
  }

  private startOwnGeneration(): void {
    const held: Array<() => void> = [];
    this.heldWrites = held;
    const next = startGeneration(this.pair.generations, (this.opts.newGenerationId ?? randomGenerationId)());
    this.opts.logger.info(
      { generation: next.current, base: next.base },
      'first write while not in step with the secondary: a new data generation',
    );
    this.persistPair({ ...this.pair, generations: next }, () => {
      this.heldWrites = undefined;
      for (const submit of held) submit();
    });
  }

  /** Persists the pair state (in order with earlier writes); `then` once it is durable. */
  private persistPair(next: PairState, then: () => void = () => {}): void {
    this.pair = next;
    const write = this.pairStateWrite.then(() => this.pairState.write(next));
    this.pairStateWrite = write.catch(() => {});
    this.ioPromise(write, then);
  }

  /** A FLUSH: `done` once every write completed before it is durable on the volume (a barrier on the stream too). */
  flush(done: Done): void {
    if (this.failure !== null) return done(this.failure);
    const flushId = this.engine.submitFlush(this.opts.clock.now());
    this.flushes.set(flushId, done);
    this.pump();
  }

  status(): PrimaryNodeStatus {
    const s = this.engine.stats();
    const link = this.session?.status();
    return {
      dirtyRegions: s.dirtyRegions,
      pendingUpdates: s.pendingUpdates,
      pendingBytes: s.inflightBytes,
      log: {
        usedBytes: s.logHeadLsn - s.logFreedLsn,
        capacityBytes: this.log.capacity,
        activeTransactions: s.activeTransactions,
      },
      resync: {
        active: link !== undefined && link.state === 'streaming' && !link.replicaConsistent,
        startedAtMs: this.resyncStart.atMs,
        totalBytes: this.resyncStart.regions * this.engine.config.regionSize,
        doneBytes: this.counters.resyncBytes - this.resyncStart.resyncBytes,
      },
      link,
      connection: this.connection && {
        tls: this.connection.secure,
        fingerprint: this.connection.peerFingerprint,
      },
      generations: this.pair.generations,
      handshake: this.lastHandshake,
    };
  }

  /** What a handshake outside the session found (a primary dialing this one's --listen address). */
  reportHandshake(report: Omit<HandshakeReport, 'atMs'>): void {
    this.lastHandshake = { ...report, atMs: this.opts.clock.now() };
  }

  /** Dirty regions as [first, last] runs, in order. */
  dirtyRanges(): [number, number][] {
    const runs: [number, number][] = [];
    for (const r of this.engine.indicator.iterate()) {
      const last = runs[runs.length - 1];
      if (last && last[1] === r - 1) last[1] = r;
      else runs.push([r, r]);
    }
    return runs;
  }

  /**
   * Graceful stop: makes completed writes durable, drops the link, persists the bitmap, and
   * waits for all I/O to settle. The caller closes the files afterwards.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    if (this.failure === null) await new Promise<void>((resolve) => this.flush(() => resolve()));
    this.closed = true;
    if (this.failure === null) {
      this.session?.stop();
      this.event(() => this.engine.requestCheckpoint(this.opts.clock.now()));
    }
    while (this.ioCount > 0 || (this.failure === null && this.engine.stats().checkpointInFlight)) {
      await new Promise<void>((resolve) => this.idleWaiters.push(resolve));
    }
    await this.pairStateWrite;
    this.timer?.cancel();
    this.connection?.close('stopping');
  }

  // ---------------------------------------------------------------------------------------------
  // The executor

  private event(fn: () => void): void {
    if (this.failure !== null) return;
    try {
      fn();
    } catch (err) {
      this.fail(err);
      return;
    }
    this.pump();
  }

  private pump(): void {
    if (this.pumping || this.failure !== null) return; // a synchronous completion re-entered: the loop goes on
    this.pumping = true;
    try {
      for (;;) {
        const a = this.engine.pollAction();
        if (a !== undefined) {
          this.performEngine(a);
          continue;
        }
        const s = this.session?.pollAction();
        if (s !== undefined) {
          this.performSession(s);
          continue;
        }
        break;
      }
      this.transmit();
    } catch (err) {
      this.fail(err);
    } finally {
      this.pumping = false;
    }
    this.armTimer();
  }

  private performEngine(a: Action): void {
    const now = () => this.opts.clock.now();
    switch (a.type) {
      case 'appendLog':
        this.counters.logRecords++;
        this.log.append(a.record);
        return;
      case 'syncLog':
        this.counters.logSyncs++;
        this.ioPromise(this.log.flush(), () => this.engine.handleLogSynced(a.throughLsn, now()));
        return;
      case 'freeLog':
        this.log.setTail(a.upToLsn, a.idLimit);
        return;
      case 'writeVolume': {
        const tx = this.txs.get(a.txId);
        const data = tx?.data[a.index] ?? null;
        const lease = data === null ? undefined : tx?.lease;
        this.buffers.set(a.updateId, { data, lease });
        this.io(
          (done) => {
            if (a.kind === 'data') {
              const written: Done = (err) => {
                lease?.drop(err === null);
                done(err);
              };
              this.storage.volume.write(a.offset, asBuffers(data ?? []), a.length, false, written);
            } else this.storage.volume.writeZeroes(a.offset, a.length, false, done);
          },
          () => this.engine.handleVolumeWritten(a.updateId, now()),
        );
        return;
      }
      case 'readRegion': {
        const buf = Buffer.allocUnsafe(a.length);
        this.io(
          (done) => this.storage.volume.read(a.offset, a.length, buf, 0, done),
          () => {
            this.buffers.set(a.updateId, { data: [buf], lease: undefined });
            this.engine.handleResyncRead(a.updateId, now());
          },
        );
        return;
      }
      case 'send': {
        const held = this.buffers.get(a.updateId);
        const data = held?.data ?? null;
        this.buffers.delete(a.updateId);
        const resync = a.source.type === 'resync';
        if (resync) this.counters.resyncBytes += a.length;
        else this.counters.replicatedBytes += a.length;
        // A region that reads back all-zero (a hole of a sparse volume, most of a fresh one)
        // travels as a zero update: no data on the wire, and the replica keeps its holes.
        const zero = resync && a.kind === 'data' && data?.every(isAllZero) === true;
        if (zero) this.counters.resyncZeroBytes += a.length;
        const kind = zero ? 'zero' : a.kind;
        this.session?.sendUpdate(
          { id: a.updateId, offset: a.offset, length: a.length, kind, resync },
          kind === 'data' ? asBuffers(data ?? []) : [],
        );
        // The frames go to the connection at the next transmit, which lets go of the bytes.
        if (held?.lease !== undefined) this.sentLeases.push(held.lease);
        return;
      }
      case 'dropUpdate':
        this.buffers.get(a.updateId)?.lease?.drop();
        this.buffers.delete(a.updateId);
        return;
      case 'complete': {
        const tx = this.txs.get(a.txId);
        this.txs.delete(a.txId);
        tx?.done(null);
        return;
      }
      case 'flushed': {
        const done = this.flushes.get(a.flushId);
        this.flushes.delete(a.flushId);
        done?.(null);
        return;
      }
      case 'persistBitmap':
        this.counters.bitmapPersists++;
        this.ioPromise(
          this.bitmap.persist(a.bitmap, a.coveredLsn, a.idLimit).finally(() => a.bitmap.release()),
          () => this.engine.handleBitmapPersisted(a.checkpointId, now()),
        );
        return;
      case 'syncVolume':
        this.counters.volumeSyncs++;
        this.io(
          (done) => this.storage.volume.flush(done),
          () => this.engine.handleVolumeSynced(a.syncId, now()),
        );
        return;
      case 'sendBarrier':
        this.session?.sendBarrier(a.kind, a.afterUpdateId);
        return;
      case 'sendResyncBegin':
        this.resyncStart = {
          atMs: now(),
          regions: this.engine.indicator.count,
          resyncBytes: this.counters.resyncBytes,
        };
        this.session?.sendResyncBegin();
        return;
      case 'allDirtyDurable':
        this.session?.handleAllDirtyDurable();
        return;
      case 'disconnect':
        this.session?.drop('no ack from the secondary within the ack timeout');
        return;
    }
  }

  private performSession(a: PrimarySessionAction): void {
    const session = this.session!;
    const now = this.opts.clock.now();
    switch (a.type) {
      case 'dial': {
        this.transmit();
        const connection = this.opts.link!.dialer.dial({
          open: () => this.connectionEvent(connection, () => session.handleOpen(this.opts.clock.now())),
          data: (chunk) =>
            this.connectionEvent(connection, () => session.handleData(chunk, this.opts.clock.now())),
          close: (reason, refused) =>
            this.connectionEvent(connection, () => {
              this.connection = undefined;
              session.handleClose(reason, this.opts.clock.now(), refused);
            }),
        });
        this.connection = connection;
        return;
      }
      case 'close':
        this.transmit();
        this.connection?.close(a.reason);
        return;
      case 'engineConnected':
        try {
          this.engine.handleConnected(a.lastApplied, now, a.replicaConsistent);
        } catch (err) {
          if (!(err instanceof VolrepError) || err.code !== 'VOLREP_ERR_PROTOCOL') throw err;
          this.opts.logger.error({ reason: err.message }, 'the secondary state does not fit this primary');
          session.drop(err.message);
        }
        return;
      case 'engineAck':
        try {
          this.engine.handleAck(a.id, now);
          this.counters.acks++;
        } catch (err) {
          if (!(err instanceof VolrepError) || err.code !== 'VOLREP_ERR_PROTOCOL') throw err;
          session.drop(`bad ack: ${err.message}`);
        }
        return;
      case 'engineWritten':
        try {
          this.engine.handleWritten(a.id, now);
        } catch (err) {
          if (!(err instanceof VolrepError) || err.code !== 'VOLREP_ERR_PROTOCOL') throw err;
          session.drop(`bad written frame: ${err.message}`);
        }
        return;
      case 'engineDisconnected':
        this.engine.handleDisconnected(now);
        return;
      case 'markDirty':
        this.engine.markAllDirty(now, a.bits);
        return;
      case 'replicaConsistent':
        // The resync's marks are cleared: persist the bitmap now, so that a crash later (and a
        // failback from this side) recovers only what is still owed, not the whole resync.
        this.engine.requestCheckpoint(now);
        return;
      case 'replicaEverSynced':
        this.persistPair({ ...this.pair, replicaEverSynced: true });
        return;
      case 'peerHoldsGeneration': {
        if (this.pair.generations.base !== null || this.pair.volumeBornZero) {
          const { volumeBornZero: _, ...pair } = this.pair;
          this.persistPair({ ...pair, generations: dropBase(this.pair.generations) });
        }
        // Every pair-state write so far (this one, or one still pending) is durable: stream.
        const { connection } = a;
        this.ioPromise(this.pairStateWrite, () => this.session?.handleBaseDropped(connection));
        return;
      }
      case 'handshake':
        this.lastHandshake = { decision: a.decision, atMs: now, peer: a.peer, reason: a.reason };
        return;
      case 'log':
        this.opts.logger[a.level](a.fields ?? {}, a.msg);
        return;
    }
  }

  /** Events of a connection that is no longer the current one are stale: ignore them. */
  private connectionEvent(connection: Connection, fn: () => void): void {
    if (this.connection !== connection) return;
    this.event(fn);
  }

  /**
   * Writes the session's frames, in order, to the current connection. The leases of the updates
   * among them end once the connection is done with their bytes (at once if there is no
   * connection or no frame: then nothing holds them).
   */
  private transmit(): void {
    const frames = this.session?.takeOutbox() ?? [];
    const leases = this.sentLeases;
    if (leases.length > 0) this.sentLeases = [];
    if (frames.length > 0 && this.connection !== undefined) {
      this.connection.write(frames, leases.length === 0 ? undefined : () => dropAll(leases));
    } else dropAll(leases);
  }

  /** One timer, at the earliest deadline of the engine and the session. */
  private armTimer(): void {
    if (this.failure !== null || this.closed) return;
    const at = Math.min(this.engine.nextDeadline(), this.session?.nextDeadline() ?? Number.POSITIVE_INFINITY);
    if (at === this.timerAtMs) return;
    this.timer?.cancel();
    this.timerAtMs = at;
    this.timer = undefined;
    if (at === Number.POSITIVE_INFINITY) return;
    this.timer = this.opts.clock.setTimer(at, () => {
      this.timer = undefined;
      this.timerAtMs = Number.POSITIVE_INFINITY;
      this.event(() => {
        const now = this.opts.clock.now();
        this.engine.handleTick(now);
        this.session?.handleTimeout(now);
      });
    });
  }

  /** Runs callback-style I/O and feeds its completion back as an event; a failure is fatal. */
  private io(start: (done: Done) => void, then: () => void): void {
    this.ioCount += 1;
    let finished = false;
    const done: Done = (err) => {
      if (finished) return;
      finished = true;
      this.ioCount -= 1;
      if (err) this.fail(err, 'io');
      else this.event(then);
      for (const wake of this.idleWaiters.splice(0)) wake();
    };
    try {
      start(done);
    } catch (err) {
      done(err as Error);
    }
  }

  private ioPromise(work: Promise<unknown>, then: () => void): void {
    this.io((done) => {
      work.then(
        () => done(null),
        (err: unknown) => done(err instanceof Error ? err : new Error(String(err))),
      );
    }, then);
  }

  /** Stops the node: after a failed I/O (`io`), or on a broken rule in the engine or session (a bug). */
  private fail(err: unknown, kind: 'io' | 'internal' = 'internal'): void {
    if (this.failure !== null) return;
    const cause = err instanceof Error ? err : new Error(String(err));
    this.failure =
      kind === 'io'
        ? new VolrepError(
            'VOLREP_ERR_IO',
            `replication engine stopped after an I/O error: ${cause.message}`,
            { cause },
          )
        : new VolrepError(
            'VOLREP_ERR_STATE',
            `replication engine stopped on an internal error: ${cause.message}`,
            {
              cause,
            },
          );
    this.timer?.cancel();
    this.connection?.close('the primary failed');
    for (const tx of this.txs.values()) tx.done(this.failure);
    this.txs.clear();
    for (const done of this.flushes.values()) done(this.failure);
    this.flushes.clear();
    // Whatever still reads a write's data (a volume write, a connection) may go on after this:
    // the callers get their memory back, never to be reused.
    for (const lease of [...this.leases]) lease.abandon();
    this.buffers.clear();
    this.sentLeases = [];
    // Writes held for a new generation's record (which may be what failed) fail too: resubmitted,
    // each finds the failure and completes with it.
    const held = this.heldWrites ?? [];
    this.heldWrites = undefined;
    for (const submit of held) submit();
    for (const wake of this.idleWaiters.splice(0)) wake();
    this.opts.logger.error({ err: this.failure.message }, 'primary failed');
    this.opts.onFailure?.(this.failure);
  }
}

/** A pair-state record; one written before generations existed gets the volume's legacy generation. */
export function validatePairState(v: unknown, volumeId?: string): PairState | undefined {
  if (typeof v !== 'object' || v === null) return undefined;
  const s = v as Record<string, unknown>;
  if (typeof s.replicaEverSynced !== 'boolean') return undefined;
  if (s.generations === undefined && volumeId !== undefined)
    return { replicaEverSynced: s.replicaEverSynced, generations: legacyGenerations(volumeId, true) };
  const generations = parseGenerations(s.generations);
  if (generations === undefined || generations.current === null) return undefined;
  const volumeBornZero = s.volumeBornZero === undefined ? undefined : parseBornZeroMark(s.volumeBornZero);
  if (s.volumeBornZero !== undefined && volumeBornZero === undefined) return undefined;
  return {
    replicaEverSynced: s.replicaEverSynced,
    generations,
    ...(volumeBornZero && { volumeBornZero }),
  };
}

/**
 * The record a new primary's pair-state file starts with: a first generation of its own, and
 * the mark of a volume file `volrep create` made itself (all zeros).
 */
export function initialPairState(volumeBornZero?: BornZeroMark): PairState {
  return {
    replicaEverSynced: false,
    generations: { current: randomGenerationId(), base: null, history: [], resync: null },
    ...(volumeBornZero && { volumeBornZero }),
  };
}

function dropAll(leases: readonly DataLease[]): void {
  for (const lease of leases) lease.drop();
}

function asBuffers(chunks: readonly Uint8Array[]): Buffer[] {
  return chunks.map((c) => (Buffer.isBuffer(c) ? c : Buffer.from(c.buffer, c.byteOffset, c.byteLength)));
}
