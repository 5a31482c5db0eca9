/**
 * The secondary's end of one replication connection, sans-I/O: bytes and time in, frames and
 * commands out. It checks the primary's hello (volume id, size, region size) and decides from
 * both sides' data generations whether this primary may write here (generations.ts: refused,
 * nothing is written, when this replica is newer, in a split brain, or unrelated). It then waits
 * until the replica's durable state is settled, decides again on what is durable, welcomes the
 * primary with it (and with the regions this side itself may hold differently), hands the stream
 * to the applier and acks the replica's durable state back each time it changes. A malformed
 * frame or a broken rule closes the connection with a reason; the replica is never touched by one.
 *
 * Dev notes. The shell feeds `handleData/Close/Timeout`, `handleSettled` (the applier is idle:
 * what it reports is durable) and `handleDurable` (the applier made more durable), then drains
 * `pollAction()` and `takeOutbox()`. States and moves are SECONDARY_TRANSITIONS.
 */
import { VolrepError } from '../errors.js';
import { ChunkQueue } from '../io/chunk-queue.js';
import type { ApplierOp, ReplicaState } from './applier.js';
import { encodeFrame, FrameDecoder } from './frames.js';
import {
  adoptGeneration,
  decideHandshake,
  describeRefusal,
  type Generations,
  type HandshakeDecision,
  shortGeneration,
} from './generations.js';
import {
  type DirtyBitmapPiece,
  decodeMessage,
  encodeAck,
  encodeDirtyBitmap,
  encodeId,
  encodeJson,
  type Hello,
  type Message,
  type Refusal,
  type Welcome,
} from './messages.js';
import type { LogLevel } from './primary-session.js';

/** A primary that has not said hello within this time is disconnected. */
export const HELLO_TIMEOUT_MS = 10_000;
/** With no frame from the primary for this long (it sends keep-alives), the link is dead. */
export const PEER_SILENCE_MS_MAX = 30_000;

export type SecondaryLinkState = 'awaitingHello' | 'settling' | 'streaming' | 'closing' | 'closed';

type SecondaryLinkEvent = 'hello' | 'settled' | 'refused' | 'fail' | 'closed';

/** Every move of one connection; `fail` is this side dropping it, `closed` the connection gone. */
const SECONDARY_TRANSITIONS: {
  readonly [S in SecondaryLinkState]: { readonly [E in SecondaryLinkEvent]?: SecondaryLinkState };
} = {
  awaitingHello: { hello: 'settling', refused: 'closing', fail: 'closing', closed: 'closed' },
  settling: { settled: 'streaming', refused: 'closing', fail: 'closing', closed: 'closed' },
  streaming: { fail: 'closing', closed: 'closed' },
  closing: { closed: 'closed', fail: 'closing' },
  closed: { closed: 'closed', fail: 'closed' },
};

export type SecondarySessionAction =
  /** The hello is good: this connection is now the primary's (it replaces any older one). Call handleSettled once the applier is idle. */
  | { type: 'accepted' }
  /** Hand an op of the stream to the applier (in order); if it refuses the op, call drop(reason). */
  | { type: 'apply'; op: ApplierOp }
  /** Close the connection now. */
  | { type: 'close'; reason: string }
  /** Send what is queued (a refusal), then close. */
  | { type: 'end'; reason: string }
  /** The generations decided against this primary (nothing was written): report it. */
  | { type: 'handshakeRefused'; decision: HandshakeDecision; peer: Generations; reason: string }
  /** The generations decided for this primary. */
  | { type: 'handshakeAccepted'; decision: HandshakeDecision; peer: Generations; windowBytes?: number }
  /**
   * Record durably that the replica takes the primary's generation and is inconsistent (a resync
   * begins), then call handleSettled again. `fullSync`: the update ids applied so far belong to
   * another log (say, a primary re-created or promoted with --force): they start again from 0.
   */
  | { type: 'recordResyncStart'; generations: Generations; fullSync: boolean }
  | { type: 'log'; level: LogLevel; msg: string; fields?: Record<string, unknown> };

export interface ReplicaIdentity {
  volumeId: string;
  size: number;
  regionSize: number;
}

/** The regions this replica itself may hold differently (its own dirty bitmap, in pieces). */
export interface ReplicaDirty {
  count: number;
  pieces: DirtyBitmapPiece[];
}

/** A decision that lets a primary write here. */
function accepts(decision: HandshakeDecision): boolean {
  return decision === 'resync' || decision === 'fullSync';
}

export class SecondarySession {
  private linkState: SecondaryLinkState = 'awaitingHello';
  private readonly actions: SecondarySessionAction[] = [];
  private outbox: Buffer[] = [];
  private readonly queue: ChunkQueue;
  private readonly decoder = new FrameDecoder();
  private readonly helloDeadlineMs: number;
  private lastHeardMs: number;
  private lastAckSent: ReplicaState | undefined;
  private hello: Hello | undefined;
  private lastWrittenSent = 0;

  constructor(
    private readonly replica: ReplicaIdentity,
    now: number,
    /** The replica's durable generations now (read at the hello). */
    private readonly generations: () => Generations,
    /**
     * This side is a primary answering on its old replication address: it refuses every hello,
     * with both sides' generations, so that two primaries that wrote apart see the split brain.
     */
    private readonly asPrimary = false,
    /** Hears of every received chunk the session is done with (its memory may be reused then). */
    onChunkDropped?: (chunk: Buffer) => void,
  ) {
    this.queue = new ChunkQueue(onChunkDropped);
    this.helloDeadlineMs = now + HELLO_TIMEOUT_MS;
    this.lastHeardMs = now;
  }

  get state(): SecondaryLinkState {
    return this.linkState;
  }

  pollAction(): SecondarySessionAction | undefined {
    return this.actions.shift();
  }

  takeOutbox(): Buffer[] {
    const out = this.outbox;
    this.outbox = [];
    return out;
  }

  nextDeadline(): number {
    if (this.linkState === 'awaitingHello') return this.helloDeadlineMs;
    if (this.linkState === 'settling' || this.linkState === 'streaming')
      return this.lastHeardMs + PEER_SILENCE_MS_MAX;
    return Number.POSITIVE_INFINITY;
  }

  handleData(chunk: Buffer, now: number): void {
    if (this.linkState === 'closing' || this.linkState === 'closed') return;
    this.lastHeardMs = now;
    this.queue.push(chunk);
    this.decodeFrames();
  }

  handleTimeout(now: number): void {
    if (this.linkState === 'awaitingHello' && now >= this.helloDeadlineMs) this.fail('no hello in time');
    else if (
      (this.linkState === 'settling' || this.linkState === 'streaming') &&
      now >= this.lastHeardMs + PEER_SILENCE_MS_MAX
    )
      this.fail('primary silent for too long');
  }

  handleClose(): void {
    this.move('closed');
  }

  /**
   * The applier is idle: `state` is durable. Decide again on it (an earlier connection's resync
   * may have ended meanwhile), then welcome the primary with it, after this side's own dirty
   * regions, and start the stream. `bornZero`: the replica was created empty by `volrep create`
   * and has received nothing since (the primary then sends only what it wrote since its own birth).
   */
  handleSettled(state: ReplicaState, dirty: ReplicaDirty, bornZero = false): void {
    if (this.linkState !== 'settling') return;
    const hello = this.hello!;
    const decision = decideHandshake(hello.generations, state.generations);
    if (!accepts(decision)) return this.refuse(decision, state.generations);
    if (state.generations.current !== hello.generations.current) {
      // The replica takes the primary's generation before the welcome, in the record that marks
      // it inconsistent: a sender never learns of it later than its receiver (model/gen_model.py).
      const generations = adoptGeneration(state.generations, hello.generations.current!);
      this.emit({ type: 'recordResyncStart', generations, fullSync: decision === 'fullSync' });
      return;
    }
    this.move('settled');
    for (const piece of dirty.pieces) this.send('dirtyBitmap', encodeDirtyBitmap(piece));
    const welcome: Welcome = {
      ...this.replica,
      role: 'secondary',
      lastAppliedUpdate: state.lastAppliedUpdate,
      consistent: state.consistent,
      generations: state.generations,
      dirtyRegions: dirty.count,
      ...(bornZero && { bornZero: true }),
    };
    this.lastAckSent = { ...state };
    this.send('welcome', [encodeJson(welcome)]);
    this.emit({
      type: 'handshakeAccepted',
      decision,
      peer: hello.generations,
      windowBytes: hello.windowBytes,
    });
    this.log('info', 'primary connected', {
      lastAppliedUpdate: state.lastAppliedUpdate,
      consistent: state.consistent,
      decision,
      ownDirtyRegions: dirty.count,
    });
    this.decodeFrames(); // anything that came while settling
  }

  /** The replica's durable state moved on: ack it. */
  handleDurable(state: ReplicaState): void {
    if (this.linkState !== 'streaming') return;
    const last = this.lastAckSent;
    if (last && last.lastAppliedUpdate === state.lastAppliedUpdate && last.consistent === state.consistent)
      return;
    this.lastAckSent = { ...state };
    this.send('ack', [encodeAck({ id: state.lastAppliedUpdate, consistent: state.consistent })]);
  }

  /** The applier wrote every update ≤ id to the replica: a sync-mode primary completes writes on it. */
  handleWritten(id: number): void {
    if (this.linkState !== 'streaming' || this.hello?.syncMode !== true) return;
    if (id <= this.lastWrittenSent) return;
    this.lastWrittenSent = id;
    this.send('written', [encodeId(id)]);
  }

  /** This side drops the connection (the applier refused an op, or the replica failed). */
  drop(reason: string): void {
    if (this.linkState !== 'closing' && this.linkState !== 'closed') this.fail(reason);
  }

  private decodeFrames(): void {
    // While settling, frames wait: nothing may reach the applier before the welcome.
    while (this.linkState === 'awaitingHello' || this.linkState === 'streaming') {
      const result = this.decoder.next(this.queue);
      if (result === undefined) return;
      if (result.kind === 'error') return this.fail(result.reason);
      const message = decodeMessage(result.frame);
      if (message.type === 'invalid') return this.fail(message.reason);
      this.handleMessage(message);
    }
  }

  private handleMessage(message: Message): void {
    if (this.linkState === 'awaitingHello') {
      if (message.type !== 'hello') return this.fail(`expected hello, got ${message.type}`);
      return this.handleHello(message.hello);
    }
    switch (message.type) {
      case 'update':
        return this.emit({
          type: 'apply',
          op: { kind: 'update', update: message.update, data: message.data },
        });
      case 'barrier':
        return this.emit({ type: 'apply', op: { kind: 'barrier' } });
      case 'resyncBegin':
        return this.emit({ type: 'apply', op: { kind: 'resyncBegin' } });
      case 'resyncEnd':
        return this.emit({ type: 'apply', op: { kind: 'resyncEnd' } });
      case 'keepAlive':
        return this.send('keepAlive');
      default:
        return this.fail(`unexpected ${message.type} from the primary`);
    }
  }

  private handleHello(hello: Hello): void {
    const r = this.replica;
    let why: string | undefined;
    if (hello.volumeId !== r.volumeId)
      why = `volume id mismatch: primary has ${hello.volumeId}, this replica belongs to ${r.volumeId}`;
    else if (hello.size !== r.size)
      why = `size mismatch: primary ${hello.size} bytes, replica ${r.size} bytes`;
    else if (hello.regionSize !== r.regionSize)
      why = `region size mismatch: primary ${hello.regionSize}, replica ${r.regionSize}`;
    if (why !== undefined) {
      this.log('warn', 'refused primary', { reason: why });
      this.move('refused');
      this.send('refuse', [encodeJson({ reason: why } satisfies Refusal)]);
      this.emit({ type: 'end', reason: why });
      return;
    }
    // Refused before it replaces the current connection; decided again once settled.
    this.hello = hello;
    const own = this.generations();
    const decision = decideHandshake(hello.generations, own);
    if (!accepts(decision)) return this.refuse(decision, own);
    if (this.asPrimary) return this.refuseAsPrimary(own);
    this.move('hello');
    this.emit({ type: 'accepted' });
  }

  /** Two primaries, and the generations alone would let the dialer write here: still refused. */
  private refuseAsPrimary(own: Generations): void {
    const reason = `the peer is a primary too (generation ${shortGeneration(own.current)}); nothing was written. Keep one primary: 'volrep demote' the other and start it as 'volrep secondary'`;
    this.log('error', 'refused a primary: this side is a primary too', { reason });
    this.move('refused');
    this.send('refuse', [encodeJson({ reason, role: 'primary', generations: own } satisfies Refusal)]);
    this.emit({ type: 'end', reason });
  }

  /** The generations say this primary must not write here: say why, with this side's view, and close. */
  private refuse(decision: HandshakeDecision, own: Generations): void {
    const reason = describeRefusal(decision, own, this.hello!.generations);
    this.log('error', 'refused primary', { decision, reason });
    this.move('refused');
    const refusal: Refusal = {
      reason,
      decision,
      role: this.asPrimary ? 'primary' : 'secondary',
      generations: own,
    };
    this.send('refuse', [encodeJson(refusal)]);
    this.emit({ type: 'handshakeRefused', decision, peer: this.hello!.generations, reason });
    this.emit({ type: 'end', reason });
  }

  private fail(reason: string): void {
    // Ops decoded after the one that broke the stream must not reach the applier.
    for (let i = this.actions.length - 1; i >= 0; i--)
      if (this.actions[i].type === 'apply') this.actions.splice(i, 1);
    this.log('warn', 'replication connection closed', { reason });
    this.move('fail');
    this.emit({ type: 'close', reason });
  }

  private send(type: Parameters<typeof encodeFrame>[0], payload: Buffer[] = []): void {
    for (const b of encodeFrame(type, payload)) this.outbox.push(b);
  }

  private move(event: SecondaryLinkEvent): void {
    const next = SECONDARY_TRANSITIONS[this.linkState][event];
    if (next === undefined) {
      throw new VolrepError(
        'VOLREP_ERR_STATE',
        `replication connection: '${event}' is not allowed in state '${this.linkState}'`,
      );
    }
    this.linkState = next;
  }

  private emit(action: SecondarySessionAction): void {
    this.actions.push(action);
  }

  private log(level: LogLevel, msg: string, fields?: Record<string, unknown>): void {
    this.emit({ type: 'log', level, msg, fields });
  }
}
