/**
 * The secondary node: the applier over the replica and its state file, and one replication
 * session per connection from the primary, run over the storage and clock it is given (node:fs
 * and TCP in the daemon, simulated ones in the simulator).
 *
 * Dev notes. The newest connection whose hello is accepted is the current one (after a silent
 * link cut the old one may linger here long after the primary reconnected); it gets the
 * welcome once the applier is idle, so the welcome reports only what is durable, and it gets
 * the acks. Reading from it pauses while the applier's backlog is over APPLY_BACKLOG_BYTES_MAX.
 * A failed replica write is fatal: the node stops and tells its owner through `onFailure`.
 *
 * The node's own dirty set: a replica that was a primary (demoted, or started as a secondary
 * without demote) may hold writes its peer never acked. Opening runs the primary's recovery on
 * its log and bitmap, folds the result into the bitmap, and reports those regions in every
 * welcome until a resync into this replica ends; then the bitmap is cleared.
 */
import { IndicatorMap } from '../core/indicator-map.js';
import { VolrepError } from '../errors.js';
import type { BlockDevice } from '../io/block-device.js';
import type { BlockFile } from '../io/block-file.js';
import type { Clock, Timer } from '../io/clock.js';
import type { ReceiveSlabs } from '../io/receive-slabs.js';
import { SlotFile } from '../io/slot-file.js';
import type { Connection, ConnectionEvents } from '../io/transport.js';
import type { BitmapFile } from '../log/bitmap-file.js';
import { recover } from '../log/recovery.js';
import { Applier, type ReplicaState } from '../replication/applier.js';
import {
  type Generations,
  type HandshakeDecision,
  legacyGenerations,
  parseGenerations,
} from '../replication/generations.js';
import { DIRTY_BITMAP_PIECE_BYTES, type DirtyBitmapPiece } from '../replication/messages.js';
import {
  type ReplicaDirty,
  type ReplicaIdentity,
  SecondarySession,
  type SecondarySessionAction,
} from '../replication/secondary-session.js';
import { type BornZeroMark, parseBornZeroMark } from '../volume/born-zero.js';
import type { NodeLogger } from './primary-node.js';

/** Bytes of updates received but not yet applied before we stop reading (backpressure). */
export const APPLY_BACKLOG_BYTES_MAX = 64 * 1024 * 1024;

export interface SecondaryStorage {
  replica: BlockDevice;
  /** The replica's durable state (a slot file): last applied update id, consistency mark, generations. */
  state: BlockFile;
  /** The log and bitmap this node keeps as a primary: its own dirty set. */
  log: BlockFile;
  bitmap: BlockFile;
}

export interface SecondaryNodeOptions {
  clock: Clock;
  logger: NodeLogger;
  onFailure?: (err: Error) => void;
  /** Whether the replica file is still as `volrep create` made it (all zeros); absent: never. */
  replicaAsCreated?: (mark: BornZeroMark) => boolean;
}

interface Peer {
  connection: Connection;
  session: SecondarySession;
  paused: boolean;
  /** Where the connection reads into, when it reads into reused memory (held until applied). */
  memory: ReceiveSlabs | undefined;
}

export interface SecondaryNodeStatus {
  peer: { address: string | null; state: 'waiting' | 'connected'; tls: boolean; fingerprint: string | null };
  lastAppliedUpdate: number;
  consistent: boolean;
  generations: Generations;
  /** Regions this replica itself may hold differently (reported in each welcome). */
  ownDirtyRegions: number;
  /** What the last handshake decided, with the peer's generations then. */
  handshake: { decision: HandshakeDecision; atMs: number; peer: Generations; reason?: string } | null;
}

/** The record a new replica's state file starts with: nothing applied, not consistent (unknown bytes), no generation. */
export const INITIAL_REPLICA_STATE: ReplicaState = {
  lastAppliedUpdate: 0,
  consistent: false,
  generations: { current: null, base: null, history: [], resync: null },
};

export class SecondaryNode {
  /** Acks sent to the primary, for metrics. */
  readonly counters = { acks: 0 };
  private readonly peers = new Set<Peer>();
  private current: Peer | undefined;
  private timer: Timer | undefined;
  private timerAtMs = Number.POSITIVE_INFINITY;
  private failure: Error | null = null;
  private closing = false;
  private lastHandshake: SecondaryNodeStatus['handshake'] = null;
  private clearing: Promise<void> = Promise.resolve();
  /**
   * The mark of a replica `volrep create` made (all zeros) that has received nothing: checked
   * against the file again at the first welcome (something may have written it since the start)
   * and said there only (the primary then sends only what it wrote since its own birth).
   */
  private bornZero: BornZeroMark | undefined;

  private constructor(
    readonly applier: Applier,
    private readonly identity: ReplicaIdentity,
    private readonly opts: SecondaryNodeOptions,
    private readonly own: OwnDirty,
    /** The replica device says when a write's data is read no more (BlockDevice.reportsRelease). */
    private readonly replicaReportsRelease: boolean,
  ) {
    const state = applier.state;
    if (state.generations.current === null && state.lastAppliedUpdate === 0) this.bornZero = state.bornZero;
    applier.onDurable = (state) => {
      // A resync into this replica ended: nothing of its own differs any more.
      if (state.consistent && this.own.dirty.count > 0) this.clearOwnDirty();
      const peer = this.current;
      if (peer === undefined) return;
      if (peer.session.state === 'streaming') this.counters.acks += 1;
      this.run(peer, () => peer.session.handleDurable(state));
    };
    applier.onFailure = (err) => this.fail(err, 'io');
    applier.onWritten = (id) => {
      const peer = this.current;
      if (peer !== undefined) this.run(peer, () => peer.session.handleWritten(id));
    };
    applier.onProgress = () => {
      const peer = this.current;
      if (peer?.paused && !this.backlogged(peer, APPLY_BACKLOG_BYTES_MAX / 2)) {
        peer.paused = false;
        peer.connection.resume();
      }
    };
  }

  /** Reads the replica's durable state (refused if missing or unreadable: H18) and starts the applier. */
  static async open(
    storage: SecondaryStorage,
    identity: ReplicaIdentity,
    opts: SecondaryNodeOptions,
  ): Promise<SecondaryNode> {
    const { slots, value } = await SlotFile.open(storage.state, 'replica-state', (v) =>
      validateReplicaState(v, identity.volumeId),
    );
    const own = await openOwnDirty(storage, Math.ceil(identity.size / identity.regionSize));
    if (own.dirty.count > 0)
      opts.logger.info(
        { regions: own.dirty.count },
        'regions this replica may hold differently (writes it made as a primary): reported to the primary',
      );
    const applier = new Applier(storage.replica, slots, value, { clock: opts.clock });
    return new SecondaryNode(applier, identity, opts, own, storage.replica.reportsRelease === true);
  }

  /** Receive memory the current connection's chunks and unapplied updates still hold (0 once all is applied). */
  get receiveMemoryHeld(): number {
    return this.current?.memory?.heldBytes ?? 0;
  }

  /**
   * Over the backlog bound: the bytes received and not yet applied, or the receive memory they
   * hold (a small update keeps a whole slab).
   */
  private backlogged(peer: Peer, bound = APPLY_BACKLOG_BYTES_MAX): boolean {
    return this.applier.queuedBytes > bound || (peer.memory?.heldBytes ?? 0) > bound;
  }

  /** Whether the replica is still as `volrep create` made it (the file checked now). */
  private replicaBornZero(): boolean {
    return this.bornZero !== undefined && this.opts.replicaAsCreated?.(this.bornZero) === true;
  }

  private clearOwnDirty(): void {
    const own = this.own;
    own.dirty = new IndicatorMap(own.regionCount);
    this.clearing = this.clearing
      .then(() => persistOwnDirty(own))
      .catch((err: unknown) => this.fail(err, 'io'));
  }

  /** The own dirty bitmap in pieces for the welcome (only pieces with a bit set). */
  private ownDirty(): ReplicaDirty {
    const pieces: DirtyBitmapPiece[] = [];
    // A view, not a copy (one bit per region is 30 MiB for 15 TiB); the pieces sent are copies.
    const bits = this.own.dirty.view();
    if (this.own.dirty.count > 0)
      for (let at = 0; at < bits.length; at += DIRTY_BITMAP_PIECE_BYTES) {
        const piece = bits.subarray(at, Math.min(bits.length, at + DIRTY_BITMAP_PIECE_BYTES));
        if (piece.some((b) => b !== 0)) pieces.push({ byteOffset: at, bits: Buffer.from(piece) });
      }
    return { count: this.own.dirty.count, pieces };
  }

  get failed(): Error | null {
    return this.failure;
  }

  status(): SecondaryNodeStatus {
    const state = this.applier.state;
    return {
      peer: {
        address: this.current?.connection.remote ?? null,
        state: this.current ? 'connected' : 'waiting',
        tls: this.current?.connection.secure ?? false,
        fingerprint: this.current?.connection.peerFingerprint ?? null,
      },
      lastAppliedUpdate: state.lastAppliedUpdate,
      consistent: state.consistent,
      generations: state.generations,
      ownDirtyRegions: this.own.dirty.count,
      handshake: this.lastHandshake,
    };
  }

  /** This replica's own dirty regions (what it may hold differently) as [first, last] runs. */
  ownDirtyRanges(): [number, number][] {
    const runs: [number, number][] = [];
    for (const r of this.own.dirty.iterate()) {
      const last = runs[runs.length - 1];
      if (last && last[1] === r - 1) last[1] = r;
      else runs.push([r, r]);
    }
    return runs;
  }

  /** A new connection from a would-be primary; returns the events its transport must report. */
  accept(connection: Connection): ConnectionEvents {
    // Update data stays in the chunks it arrived in until its replica write is done: read into
    // reused memory, where the replica says when it is done with it (README, Performance).
    const memory = this.replicaReportsRelease ? connection.receiveIntoSlabs?.() : undefined;
    const peer: Peer = {
      connection,
      session: new SecondarySession(
        this.identity,
        this.opts.clock.now(),
        () => this.applier.state.generations,
        false,
        memory && ((chunk) => memory.dropChunk(chunk)),
      ),
      paused: false,
      memory,
    };
    if (this.failure !== null || this.closing) {
      connection.close(this.failure ? `replica failed: ${this.failure.message}` : 'stopping');
    } else {
      this.peers.add(peer);
      this.armTimer();
    }
    return {
      open: () => {},
      data: (chunk) => this.run(peer, () => peer.session.handleData(chunk, this.opts.clock.now())),
      close: (reason) => {
        this.peers.delete(peer);
        if (this.current === peer) this.current = undefined;
        // A link that was up and went away without the session closing it: say so, with why.
        if (peer.session.state === 'streaming' || peer.session.state === 'settling')
          this.opts.logger.info({ peer: connection.remote, reason }, 'primary disconnected');
        peer.session.handleClose();
        this.armTimer();
      },
    };
  }

  /** Closes every connection and waits until what was received is applied and durable. */
  async close(): Promise<void> {
    this.closing = true;
    this.timer?.cancel();
    for (const peer of this.peers) peer.connection.close('stopping');
    await this.applier.whenIdle();
    await this.clearing;
  }

  /** Runs an input of one peer's session, then performs what it asks. */
  private run(peer: Peer, fn: () => void): void {
    if (!this.peers.has(peer)) return;
    try {
      fn();
      for (let a = peer.session.pollAction(); a !== undefined; a = peer.session.pollAction())
        this.perform(peer, a);
    } catch (err) {
      this.fail(err);
      return;
    }
    const frames = peer.session.takeOutbox();
    if (frames.length > 0) peer.connection.write(frames);
    this.armTimer();
  }

  private perform(peer: Peer, a: SecondarySessionAction): void {
    switch (a.type) {
      case 'accepted': {
        const previous = this.current;
        this.current = peer;
        if (previous !== undefined && previous !== peer) {
          this.opts.logger.warn({}, 'a new connection from the primary replaces the previous one');
          previous.connection.close('replaced by a newer connection from the primary');
        }
        // Report only what is durable: let the applier finish what an earlier link left.
        void this.applier.whenIdle().then(() =>
          this.run(peer, () => {
            if (this.applier.failed) peer.session.drop(`replica failed: ${this.applier.failed.message}`);
            else peer.session.handleSettled(this.applier.state, this.ownDirty(), this.replicaBornZero());
          }),
        );
        return;
      }
      case 'apply': {
        if (this.current !== peer) return peer.session.drop('a newer connection from the primary took over');
        let op = a.op;
        const { memory } = peer;
        if (memory !== undefined && op.kind === 'update' && op.update.kind === 'data') {
          // Held from here (before the applier may write it, even at once) until written.
          const { data } = op;
          memory.hold(data);
          op = { ...op, released: (reusable) => (reusable ? memory.release(data) : memory.abandon(data)) };
        }
        const problem = this.applier.push(op);
        if (problem !== undefined) {
          if (op !== a.op && op.kind === 'update') memory?.release(op.data);
          return peer.session.drop(problem);
        }
        if (!peer.paused && this.backlogged(peer)) {
          peer.paused = true;
          peer.connection.pause();
        }
        return;
      }
      case 'close':
        peer.connection.write(peer.session.takeOutbox());
        peer.connection.close(a.reason);
        return;
      case 'end':
        peer.connection.write(peer.session.takeOutbox());
        peer.connection.end(a.reason);
        return;
      case 'log':
        this.opts.logger[a.level]({ peer: peer.connection.remote, ...a.fields }, a.msg);
        return;
      case 'handshakeRefused':
        this.lastHandshake = {
          decision: a.decision,
          atMs: this.opts.clock.now(),
          peer: a.peer,
          reason: a.reason,
        };
        return;
      case 'recordResyncStart':
        void this.applier.recordResyncStart(a.generations, a.fullSync).then(() =>
          this.run(peer, () => {
            if (this.applier.failed) peer.session.drop(`replica failed: ${this.applier.failed.message}`);
            else peer.session.handleSettled(this.applier.state, this.ownDirty(), this.replicaBornZero());
          }),
        );
        return;
      case 'handshakeAccepted':
        this.bornZero = undefined; // welcomed once: from here on the replica may receive data
        this.lastHandshake = { decision: a.decision, atMs: this.opts.clock.now(), peer: a.peer };
        this.applier.peerWindow(a.windowBytes);
        return;
    }
  }

  private armTimer(): void {
    if (this.failure !== null || this.closing) return;
    let at = Number.POSITIVE_INFINITY;
    for (const peer of this.peers) at = Math.min(at, peer.session.nextDeadline());
    if (at === this.timerAtMs) return;
    this.timer?.cancel();
    this.timer = undefined;
    this.timerAtMs = at;
    if (at === Number.POSITIVE_INFINITY) return;
    this.timer = this.opts.clock.setTimer(at, () => {
      this.timer = undefined;
      this.timerAtMs = Number.POSITIVE_INFINITY;
      const now = this.opts.clock.now();
      for (const peer of [...this.peers]) this.run(peer, () => peer.session.handleTimeout(now));
      this.armTimer();
    });
  }

  /** Stops the node: after a failed replica write (`io`), or on a broken rule in a session (a bug). */
  private fail(err: unknown, kind: 'io' | 'internal' = 'internal'): void {
    if (this.failure !== null) return;
    const cause = err instanceof Error ? err : new Error(String(err));
    this.failure =
      kind === 'io'
        ? new VolrepError('VOLREP_ERR_IO', `replica failed after an I/O error: ${cause.message}`, { cause })
        : new VolrepError('VOLREP_ERR_STATE', `secondary stopped on an internal error: ${cause.message}`, {
            cause,
          });
    this.timer?.cancel();
    for (const peer of this.peers) peer.connection.close(this.failure.message);
    this.opts.logger.error({ err: this.failure.message }, 'secondary failed');
    this.opts.onFailure?.(this.failure);
  }
}

interface OwnDirty {
  bitmap: BitmapFile;
  dirty: IndicatorMap;
  regionCount: number;
  coveredLsn: number;
  idLimit: number;
}

/**
 * The regions this node may hold differently from its peer: its bitmap plus the incomplete
 * transactions of its log (a primary's recovery). Folded into the bitmap, covering the whole
 * log, so a later recovery finds the same set without the log.
 */
async function openOwnDirty(storage: SecondaryStorage, regionCount: number): Promise<OwnDirty> {
  const r = await recover(storage.log, storage.bitmap, regionCount);
  const dirty = IndicatorMap.adopt(regionCount, r.state.dirty);
  const own = { bitmap: r.bitmap, dirty, regionCount, coveredLsn: r.log.headLsn, idLimit: r.state.idLimit };
  if (r.report.records > 0 || r.report.dirty !== r.report.bitmapDirty) await persistOwnDirty(own);
  return own;
}

/** Writes the own dirty bitmap as it is now, from a frozen image: no copy of one bit per region. */
function persistOwnDirty(own: OwnDirty): Promise<void> {
  const image = own.dirty.freeze([]);
  return own.bitmap.persist(image, own.coveredLsn, own.idLimit).finally(() => image.release());
}

/** A replica-state record; one written before generations existed gets the volume's legacy generation. */
export function validateReplicaState(v: unknown, volumeId: string): ReplicaState | undefined {
  if (typeof v !== 'object' || v === null) return undefined;
  const s = v as Record<string, unknown>;
  if (
    typeof s.lastAppliedUpdate !== 'number' ||
    !Number.isSafeInteger(s.lastAppliedUpdate) ||
    s.lastAppliedUpdate < 0
  ) {
    return undefined;
  }
  if (typeof s.consistent !== 'boolean') return undefined;
  const generations =
    s.generations === undefined
      ? legacyGenerations(volumeId, s.consistent || s.lastAppliedUpdate > 0)
      : parseGenerations(s.generations);
  if (generations === undefined) return undefined;
  const bornZero = s.bornZero === undefined ? undefined : parseBornZeroMark(s.bornZero);
  if (s.bornZero !== undefined && bornZero === undefined) return undefined;
  return {
    lastAppliedUpdate: s.lastAppliedUpdate,
    consistent: s.consistent,
    generations,
    ...(bornZero && { bornZero }),
  };
}
