/**
 * The primary's end of the replication link, sans-I/O: bytes and time in, frames and commands
 * out. It connects (and reconnects with capped exponential backoff), says hello, checks the
 * welcome, decides whether the replica needs a full sync, then carries the engine's ordered
 * stream out and the replica's durable state (acks) back. Whether this side may write there at
 * all is the data generations' decision (generations.ts), taken on the welcome, or the
 * secondary's refusal, which says why.
 *
 * Dev notes. The shell feeds `handleOpen/Data/Close/Timeout` and the engine's stream
 * (`sendUpdate`, `sendBarrier`, `sendResyncBegin`, `handleAllDirtyDurable`, `drop`), then drains
 * `pollAction()` and `takeOutbox()` (frames to write, in order, in one write). The states and
 * their moves are the table PRIMARY_TRANSITIONS; anything else is a named error. The engine is
 * told about the link only through actions (`engineConnected`, `engineAck`, ...), so the order
 * of everything that reaches it is the order of this machine's actions.
 */
import { IndicatorMap } from '../core/indicator-map.js';
import { VolrepError } from '../errors.js';
import { ChunkQueue } from '../io/chunk-queue.js';
import type { BornZeroMark } from '../volume/born-zero.js';
import { encodeFrame, FrameDecoder } from './frames.js';
import { decideHandshake, describeRefusal, type Generations, type HandshakeOutcome } from './generations.js';
import {
  type Ack,
  type DirtyBitmapPiece,
  decodeMessage,
  encodeId,
  encodeJson,
  encodeUpdateHeader,
  type Message,
  type Refusal,
  UPDATE_FLAG_RESYNC,
  type UpdateHeader,
  type Welcome,
} from './messages.js';

export const RECONNECT_DELAY_MS_MIN = 20;
/**
 * A secondary that does not answer (restarting, rebooting, the link cut) is dialed again at least
 * this often, so one that comes back is streaming within about this time: a resync waits for the
 * dial. A failed dial costs one connect attempt (a refused TCP connect, or a timed-out one).
 */
export const RECONNECT_DELAY_MS_MAX = 50;
/**
 * After a refusal, or a connection that failed authentication (the secondary's TLS refused this
 * primary's certificate, or this primary the secondary's), the delay grows to this instead: the
 * pair needs an operator, and a TLS handshake is not free.
 */
export const REFUSED_RETRY_DELAY_MS_MAX = 5_000;
/** While connected, a keep-alive goes out this often (the secondary answers each). */
export const KEEP_ALIVE_INTERVAL_MS = 1_000;
/** Default for how long the secondary may be silent before the link counts as dead. */
export const PEER_SILENCE_MS_MAX = 5_000;
/** Covers the TCP connect and the hello/welcome exchange: a secondary that never answers is dropped. */
export const CONNECT_TIMEOUT_MS = 5_000;

export type PrimaryLinkState =
  | 'idle'
  | 'connecting'
  | 'greeting'
  | 'marking'
  | 'streaming'
  | 'closing'
  | 'backoff'
  | 'stopped';

type PrimaryLinkEvent =
  | 'start'
  | 'open'
  | 'welcome'
  | 'welcomeMarking'
  | 'refused'
  | 'marked'
  | 'fail'
  | 'closed'
  | 'retry'
  | 'stop';

/**
 * Every move of the link. `fail` is this side dropping the connection (timeout, protocol error,
 * the engine's ack timeout); `closed` is the connection gone. `marking`: nothing is sent until
 * what the welcome asks of this side is durable — every region dirty for a replica without any
 * history (a full sync), the secondary's own dirty regions, and the dropped base when the replica
 * took this side's generation.
 */
const PRIMARY_TRANSITIONS: {
  readonly [S in PrimaryLinkState]: { readonly [E in PrimaryLinkEvent]?: PrimaryLinkState };
} = {
  idle: { start: 'connecting', stop: 'stopped' },
  connecting: { open: 'greeting', fail: 'closing', closed: 'backoff', stop: 'stopped' },
  greeting: {
    welcome: 'streaming',
    welcomeMarking: 'marking',
    refused: 'closing',
    fail: 'closing',
    closed: 'backoff',
    stop: 'stopped',
  },
  marking: { marked: 'streaming', fail: 'closing', closed: 'backoff', stop: 'stopped' },
  streaming: { fail: 'closing', closed: 'backoff', stop: 'stopped' },
  closing: { closed: 'backoff', stop: 'stopped' },
  backoff: { retry: 'connecting', stop: 'stopped' },
  stopped: { closed: 'stopped', stop: 'stopped' },
};

export type LogLevel = 'debug' | 'info' | 'warn' | 'error';

export type PrimarySessionAction =
  /** Open a connection to the secondary; report it with handleOpen / handleData / handleClose. */
  | { type: 'dial' }
  /** Close the current connection (handleClose follows). */
  | { type: 'close'; reason: string }
  /** The engine: the secondary is connected and holds everything ≤ lastApplied durably. */
  | { type: 'engineConnected'; lastApplied: number; replicaConsistent: boolean }
  | { type: 'engineAck'; id: number }
  /** Sync mode: the secondary wrote (not yet synced) every update up to `id`. */
  | { type: 'engineWritten'; id: number }
  | { type: 'engineDisconnected' }
  /**
   * The engine: mark regions dirty durably before anything is sent — all of them for a full
   * sync, or those in `bits` (the secondary's own dirty bitmap); handleAllDirtyDurable follows.
   */
  | { type: 'markDirty'; bits?: Uint8Array }
  /** Record durably that a replica of this primary has been consistent (for --assume-clean). */
  | { type: 'replicaEverSynced' }
  /** The replica became consistent (a resync ended): a good moment to persist the cleaner bitmap. */
  | { type: 'replicaConsistent' }
  /**
   * The secondary durably holds this side's generation: drop the base (nothing apart any more)
   * and the volume's born-zero mark (acks may clean regions from now on), and call
   * handleBaseDropped(connection) once the pair state holding that is durable.
   */
  | { type: 'peerHoldsGeneration'; connection: number }
  /** What the generations decided on this connection (for status, logs and metrics). */
  | { type: 'handshake'; decision: HandshakeOutcome; peer: Generations | null; reason?: string }
  | { type: 'log'; level: LogLevel; msg: string; fields?: Record<string, unknown> };

/** What the primary keeps about the pair across restarts (the pair-state file). */
export interface PairState {
  /** A replica of this primary has been consistent at least once. */
  replicaEverSynced: boolean;
  /**
   * `volrep create` made this volume empty (all zeros) and no replica has been welcomed since:
   * every region written since is dirty (nothing acked it). Dropped durably at the first welcome;
   * trusted only while the file is as created (src/volume/born-zero.ts).
   */
  volumeBornZero?: BornZeroMark;
  /** The generation of this side's data (DESIGN.md §7). */
  generations: Generations;
}

export interface PrimarySessionOptions {
  hello: { volumeId: string; size: number; regionSize: number };
  /** Both volumes are known identical at the pair's birth: no initial full sync. */
  assumeClean: boolean;
  replicaEverSynced: boolean;
  /** PairState.volumeBornZero is there, and the volume file is still as created. */
  volumeBornZero?: boolean;
  /** This side's generations now (the shell owns and persists them). */
  generations: () => Generations;
  /** No frame at all from the secondary for this long means the link is dead. */
  silenceMsMax?: number;
  /** Sync mode: ask the secondary for `written` frames (engineWritten). */
  syncMode?: boolean;
  /** The engine's in-flight window, told to the secondary (it syncs before that much is unacked). */
  windowBytes?: number;
}

export interface PrimarySessionStatus {
  state: PrimaryLinkState;
  /** The replica's durable consistency mark, as last reported; false while not connected. */
  replicaConsistent: boolean;
  lastAckedUpdate: number;
  /** Connections that reached the welcome (a new one starts a new "epoch" of the stream). */
  connections: number;
  reconnects: number;
}

export class PrimarySession {
  private linkState: PrimaryLinkState = 'idle';
  private readonly actions: PrimarySessionAction[] = [];
  private outbox: Buffer[] = [];
  private queue = new ChunkQueue();
  private decoder = new FrameDecoder();
  private delayMs = RECONNECT_DELAY_MS_MIN;
  /** In `marking`: what the stream still waits for. */
  private marking: { dirty: boolean; baseDrop: boolean; replicaConsistent: boolean } | undefined;
  /** The last attempt ended in the secondary's refusal: back off further (it needs an operator). */
  private refused = false;
  private retryAtMs = Number.POSITIVE_INFINITY;
  private connectDeadlineMs = Number.POSITIVE_INFINITY;
  private keepAliveAtMs = Number.POSITIVE_INFINITY;
  private lastHeardMs = 0;
  private engineConnected = false;
  private welcome: Welcome | undefined;
  private replicaConsistent = false;
  private lastAcked = 0;
  private connections = 0;
  private reconnects = 0;
  private replicaEverSynced: boolean;
  private volumeBornZero: boolean;
  private readonly silenceMsMax: number;
  /** The generations the hello of this connection carried. */
  private helloGenerations: Generations | undefined;
  /** The secondary's own dirty bitmap, as its pieces arrive before the welcome. */
  private peerDirty: Uint8Array | undefined;
  private readonly bitmapBytes: number;
  private readonly regionCount: number;

  constructor(private readonly opts: PrimarySessionOptions) {
    this.replicaEverSynced = opts.replicaEverSynced;
    this.volumeBornZero = opts.volumeBornZero === true;
    this.regionCount = Math.ceil(opts.hello.size / opts.hello.regionSize);
    this.bitmapBytes = IndicatorMap.byteLength(this.regionCount);
    this.silenceMsMax = opts.silenceMsMax ?? PEER_SILENCE_MS_MAX;
  }

  get state(): PrimaryLinkState {
    return this.linkState;
  }

  status(): PrimarySessionStatus {
    return {
      state: this.linkState,
      replicaConsistent: this.replicaConsistent,
      lastAckedUpdate: this.lastAcked,
      connections: this.connections,
      reconnects: this.reconnects,
    };
  }

  pollAction(): PrimarySessionAction | undefined {
    return this.actions.shift();
  }

  /** Frames to write on the current connection, in order; empties the outbox. */
  takeOutbox(): Buffer[] {
    const out = this.outbox;
    this.outbox = [];
    return out;
  }

  /** When handleTimeout is next due (Infinity: never). */
  nextDeadline(): number {
    switch (this.linkState) {
      case 'connecting':
      case 'greeting':
        return this.connectDeadlineMs;
      case 'marking':
      case 'streaming':
        return Math.min(this.keepAliveAtMs, this.lastHeardMs + this.silenceMsMax);
      case 'backoff':
        return this.retryAtMs;
      default:
        return Number.POSITIVE_INFINITY;
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Events from the shell

  start(now: number): void {
    this.move('start');
    this.dial(now);
  }

  stop(): void {
    const wasConnected = this.connectionUp();
    this.move('stop');
    if (this.engineConnected) this.disconnectEngine();
    if (wasConnected) this.emit({ type: 'close', reason: 'stopping' });
  }

  handleOpen(now: number): void {
    if (this.linkState !== 'connecting') return; // a connection we already gave up on
    this.move('open');
    this.lastHeardMs = now;
    this.helloGenerations = this.opts.generations();
    this.peerDirty = undefined;
    this.send('hello', [
      encodeJson({
        ...this.opts.hello,
        role: 'primary',
        generations: this.helloGenerations,
        ...(this.opts.syncMode === true && { syncMode: true }),
        ...(this.opts.windowBytes !== undefined && { windowBytes: this.opts.windowBytes }),
      }),
    ]);
  }

  handleData(chunk: Buffer, now: number): void {
    if (!this.reading()) return;
    this.lastHeardMs = now;
    this.queue.push(chunk);
    for (;;) {
      const result = this.decoder.next(this.queue);
      if (result === undefined) return;
      if (result.kind === 'error') return this.fail(`bad frame from the secondary: ${result.reason}`);
      const message = decodeMessage(result.frame);
      if (message.type === 'invalid') return this.fail(`bad message from the secondary: ${message.reason}`);
      this.handleMessage(message);
      if (!this.reading()) return;
    }
  }

  /** The connection went; `refused`: it failed authentication (TLS), so redial slowly. */
  handleClose(reason: string, now: number, refused = false): void {
    if (this.linkState === 'stopped' || this.linkState === 'backoff' || this.linkState === 'idle') return;
    const wasStreaming = this.welcome !== undefined;
    this.move('closed');
    if (this.engineConnected) this.disconnectEngine();
    this.replicaConsistent = false;
    this.welcome = undefined;
    this.marking = undefined;
    if (wasStreaming) {
      this.reconnects += 1;
      this.log('warn', 'replication link down', { reason });
    } else {
      this.log('debug', 'could not connect to the secondary', { reason });
    }
    const cap = this.refused || refused ? REFUSED_RETRY_DELAY_MS_MAX : RECONNECT_DELAY_MS_MAX;
    const delay = Math.min(this.delayMs, cap);
    this.retryAtMs = now + delay;
    this.delayMs = Math.min(delay * 2, cap);
    this.refused = false;
  }

  handleTimeout(now: number): void {
    switch (this.linkState) {
      case 'connecting':
      case 'greeting':
        if (now >= this.connectDeadlineMs) this.fail('no welcome from the secondary in time');
        return;
      case 'marking':
      case 'streaming':
        if (now >= this.lastHeardMs + this.silenceMsMax) return this.fail('secondary silent for too long');
        if (now >= this.keepAliveAtMs) {
          this.send('keepAlive');
          this.keepAliveAtMs = now + KEEP_ALIVE_INTERVAL_MS;
        }
        return;
      case 'backoff':
        if (now >= this.retryAtMs) {
          this.move('retry');
          this.dial(now);
        }
        return;
    }
  }

  /** This side drops the connection (the engine's ack timeout, or it refused the welcome). */
  drop(reason: string): void {
    if (this.reading()) this.fail(reason);
  }

  // ---------------------------------------------------------------------------------------------
  // The engine's stream (ignored unless the engine is connected: it is told when it is not)

  sendUpdate(update: UpdateHeader, data: readonly Buffer[]): void {
    if (!this.engineConnected) return;
    const flags = update.resync ? UPDATE_FLAG_RESYNC : 0;
    this.send('update', [encodeUpdateHeader(update), ...data], flags);
  }

  sendBarrier(kind: 'flush' | 'resyncEnd', afterUpdateId: number): void {
    if (!this.engineConnected) return;
    if (kind === 'resyncEnd')
      this.log('info', 'resync sent: the replica is consistent once this is durable', { afterUpdateId });
    this.send(kind === 'resyncEnd' ? 'resyncEnd' : 'barrier', [encodeId(afterUpdateId)]);
  }

  sendResyncBegin(): void {
    if (!this.engineConnected) return;
    this.replicaConsistent = false; // from the moment it reads this mark until the end is durable
    this.send('resyncBegin', [encodeId(this.lastAcked)]);
  }

  // ---------------------------------------------------------------------------------------------
  // Internals

  private handleMessage(message: Message): void {
    if (this.linkState === 'greeting') {
      if (message.type === 'refuse') return this.handleRefusal(message.refusal);
      if (message.type === 'dirtyBitmap') return this.handleDirtyPiece(message.piece);
      if (message.type !== 'welcome') return this.fail(`expected welcome, got ${message.type}`);
      return this.handleWelcome(message.welcome);
    }
    switch (message.type) {
      case 'ack':
        return this.handleAck(message.ack);
      case 'written':
        if (this.opts.syncMode !== true)
          return this.fail('written frame, but this primary is not in sync mode');
        if (this.engineConnected) this.emit({ type: 'engineWritten', id: message.id });
        return;
      case 'keepAlive':
        return;
      default:
        return this.fail(`unexpected ${message.type} from the secondary`);
    }
  }

  private handleRefusal(refusal: Refusal): void {
    this.log('error', 'the secondary refused this primary', {
      reason: refusal.reason,
      ...(refusal.decision && { decision: refusal.decision }),
    });
    const decision = refusal.decision ?? (refusal.role === 'primary' ? 'peerIsPrimary' : undefined);
    if (decision !== undefined)
      this.emit({ type: 'handshake', decision, peer: refusal.generations ?? null, reason: refusal.reason });
    this.refused = true;
    this.move('refused');
    this.emit({ type: 'close', reason: `refused by the secondary: ${refusal.reason}` });
  }

  private handleDirtyPiece(piece: DirtyBitmapPiece): void {
    if (piece.byteOffset + piece.bits.length > this.bitmapBytes)
      return this.fail(
        `the secondary's dirty bitmap reaches beyond the volume's ${this.bitmapBytes} bytes of it`,
      );
    this.peerDirty ??= new Uint8Array(this.bitmapBytes);
    this.peerDirty.set(piece.bits, piece.byteOffset);
  }

  private handleWelcome(welcome: Welcome): void {
    const { hello } = this.opts;
    if (
      welcome.volumeId !== hello.volumeId ||
      welcome.size !== hello.size ||
      welcome.regionSize !== hello.regionSize
    ) {
      return this.fail(
        `the secondary welcomed another volume (${welcome.volumeId}, ${welcome.size} bytes, regions of ${welcome.regionSize})`,
      );
    }
    const own = this.opts.generations();
    // A write apart started a new generation after the hello went out: the secondary took the
    // old one. Say hello again with the new one.
    if (own !== this.helloGenerations)
      return this.fail('this side started a new generation during the handshake');
    const decision = decideHandshake(own, welcome.generations);
    if (decision !== 'resync' && decision !== 'fullSync') {
      const reason = describeRefusal(decision, welcome.generations, own);
      this.log('error', 'the generations forbid replicating to this secondary', { decision, reason });
      this.emit({ type: 'handshake', decision, peer: welcome.generations, reason });
      return this.fail(reason);
    }
    const peerDirty = this.peerDirty;
    this.peerDirty = undefined;
    let peerDirtyCount = 0;
    try {
      if (peerDirty !== undefined) peerDirtyCount = IndicatorMap.countOf(this.regionCount, peerDirty);
    } catch {
      return this.fail("the secondary's dirty bitmap names regions beyond the volume");
    }
    if (peerDirtyCount !== welcome.dirtyRegions)
      return this.fail(
        `the secondary announced ${welcome.dirtyRegions} dirty regions of its own and sent ${peerDirtyCount}`,
      );
    this.emit({ type: 'handshake', decision, peer: welcome.generations });
    this.welcome = welcome;
    this.connections += 1;
    // The replica took this side's generation before welcoming it: nothing here is apart any
    // more. The model drops the base before anything is streamed, so the stream waits until that
    // is durable: a power loss here after a resync that ended on the replica must not bring the
    // base back (a demote would then give up the generation the replica holds: a false split
    // brain). The base may be gone in memory already with its write still pending: wait anyway.
    // Both volumes born zero: the replica needs only the regions written since (all dirty here).
    const bornZero = this.volumeBornZero && welcome.bornZero === true;
    // (The replica always holds this side's generation once it welcomes; the born-zero mark must
    // go durably before the stream as well, whatever the generations say.)
    const baseDrop = welcome.generations.current === own.current || this.volumeBornZero;
    this.volumeBornZero = false;
    if (baseDrop) this.emit({ type: 'peerHoldsGeneration', connection: this.connections });
    this.keepAliveAtMs = this.lastHeardMs + KEEP_ALIVE_INTERVAL_MS;
    this.delayMs = RECONNECT_DELAY_MS_MIN;
    this.replicaConsistent = welcome.consistent;
    this.lastAcked = welcome.lastAppliedUpdate;
    this.log('info', 'connected to the secondary', {
      lastAppliedUpdate: welcome.lastAppliedUpdate,
      consistent: welcome.consistent,
    });
    // A replica that never received anything holds unknown bytes. --assume-clean speaks of the
    // pair's birth only: once a replica of this primary has been consistent, a replica without
    // history (say, one re-created) gets a full sync.
    const virgin = decision === 'fullSync';
    if (virgin && bornZero && !this.replicaEverSynced)
      this.log('info', 'both volumes were created empty: sending only the regions written since');
    const assumeClean = (this.opts.assumeClean || bornZero) && !this.replicaEverSynced;
    if (virgin && this.opts.assumeClean && !assumeClean) {
      this.log(
        'warn',
        'ignoring --assume-clean: this primary has replicated before, and this replica has no history',
      );
    }
    if (virgin && !assumeClean) {
      this.log('info', 'the replica has never been synchronised: full initial sync');
      this.marking = { dirty: true, baseDrop, replicaConsistent: false };
      this.move('welcomeMarking');
      this.emit({ type: 'markDirty' });
      return;
    }
    if (peerDirty !== undefined && peerDirtyCount > 0) {
      // Regions the secondary itself may hold differently (its unacked writes as a primary):
      // dirty here, durably, before the resync that sends them.
      this.log('info', 'the secondary holds regions of its own that may differ: resyncing them too', {
        regions: peerDirtyCount,
      });
      this.marking = { dirty: true, baseDrop, replicaConsistent: false };
      this.move('welcomeMarking');
      this.emit({ type: 'markDirty', bits: peerDirty });
      return;
    }
    // A replica not (yet) consistent gets a resync pass, whose end mark makes it consistent.
    const replicaConsistent = welcome.consistent && welcome.generations.current === own.current;
    if (baseDrop) {
      this.marking = { dirty: false, baseDrop, replicaConsistent };
      this.move('welcomeMarking');
      return;
    }
    this.move('welcome');
    this.connectEngine(welcome.lastAppliedUpdate, replicaConsistent);
  }

  private handleAck(ack: Ack): void {
    if (!this.engineConnected) {
      // Before the stream starts (marking) the secondary has nothing new to ack.
      if (ack.id > this.lastAcked) this.fail(`ack for ${ack.id} before anything was sent`);
      return;
    }
    if (ack.id < this.lastAcked) return this.fail(`ack for ${ack.id} after ack for ${this.lastAcked}`);
    this.lastAcked = ack.id;
    const becameConsistent = ack.consistent && !this.replicaConsistent;
    this.replicaConsistent = ack.consistent;
    this.emit({ type: 'engineAck', id: ack.id });
    if (!ack.consistent) return;
    if (becameConsistent) {
      this.log('info', 'the replica is consistent', { lastAppliedUpdate: ack.id });
      this.emit({ type: 'replicaConsistent' });
    }
    if (!this.replicaEverSynced) {
      this.replicaEverSynced = true;
      this.emit({ type: 'replicaEverSynced' });
    }
  }

  /**
   * Writes now are in step with the secondary: it holds this side's generation and the stream
   * carries them (in `marking` they are marked dirty, and the stream that follows sends them).
   */
  inStep(): boolean {
    return this.linkState === 'streaming' || this.linkState === 'marking';
  }

  /** The engine's marks for a full sync are durable: start the stream once nothing else is awaited. */
  handleAllDirtyDurable(): void {
    if (this.linkState !== 'marking' || this.marking === undefined) return; // the connection went away meanwhile
    this.marking.dirty = false;
    this.endMarking();
  }

  /** The pair state without a base is durable (for the connection `connection`). */
  handleBaseDropped(connection: number): void {
    if (this.linkState !== 'marking' || this.marking === undefined || connection !== this.connections) return;
    this.marking.baseDrop = false;
    this.endMarking();
  }

  private endMarking(): void {
    const m = this.marking!;
    if (m.dirty || m.baseDrop) return;
    this.marking = undefined;
    this.move('marked');
    this.connectEngine(this.welcome!.lastAppliedUpdate, m.replicaConsistent);
  }

  private connectEngine(lastApplied: number, replicaConsistent: boolean): void {
    this.engineConnected = true;
    this.emit({ type: 'engineConnected', lastApplied, replicaConsistent });
  }

  private disconnectEngine(): void {
    this.engineConnected = false;
    this.emit({ type: 'engineDisconnected' });
  }

  private dial(now: number): void {
    this.queue = new ChunkQueue();
    this.decoder = new FrameDecoder();
    this.outbox = [];
    this.connectDeadlineMs = now + CONNECT_TIMEOUT_MS;
    this.emit({ type: 'dial' });
  }

  /** This side gives up on the connection: the engine loses it now, the transport closes next. */
  private fail(reason: string): void {
    this.log('warn', 'dropping the replication link', { reason });
    this.move('fail');
    if (this.engineConnected) this.disconnectEngine();
    this.replicaConsistent = false;
    this.emit({ type: 'close', reason });
  }

  /** A connection is up and this side still takes what it sends. */
  private reading(): boolean {
    return this.connectionUp() && this.linkState !== 'closing';
  }

  private connectionUp(): boolean {
    return (
      this.linkState === 'connecting' ||
      this.linkState === 'greeting' ||
      this.linkState === 'marking' ||
      this.linkState === 'streaming' ||
      this.linkState === 'closing'
    );
  }

  private send(type: Parameters<typeof encodeFrame>[0], payload: Buffer[] = [], flags = 0): void {
    for (const b of encodeFrame(type, payload, flags)) this.outbox.push(b);
  }

  private move(event: PrimaryLinkEvent): void {
    const next = PRIMARY_TRANSITIONS[this.linkState][event];
    if (next === undefined) {
      throw new VolrepError(
        'VOLREP_ERR_STATE',
        `replication link: '${event}' is not allowed in state '${this.linkState}'`,
      );
    }
    this.linkState = next;
  }

  private emit(action: PrimarySessionAction): void {
    this.actions.push(action);
  }

  private log(level: LogLevel, msg: string, fields?: Record<string, unknown>): void {
    this.emit({ type: 'log', level, msg, fields });
  }
}
