/**
 * The secondary's end of one replication connection, sans-I/O: bytes and time in, frames and
 * commands out. It checks the primary's hello (volume id, size, region size), waits until the
 * replica's durable state is settled, welcomes the primary with it, then hands the stream to the
 * applier and acks the replica's durable state back each time it changes. A malformed frame or
 * a broken rule closes the connection with a reason; the replica is never touched by one.
 *
 * Dev notes. The shell feeds `handleData/Close/Timeout`, `handleSettled` (the applier is idle:
 * what it reports is durable) and `handleDurable` (the applier made more durable), then drains
 * `pollAction()` and `takeOutbox()`. States and moves are SECONDARY_TRANSITIONS.
 */
import { VolrepError } from '../errors.js';
import { ChunkQueue } from '../io/chunk-queue.js';
import type { ApplierOp, ReplicaState } from './applier.js';
import { encodeFrame, FrameDecoder } from './frames.js';
import { decodeMessage, encodeAck, encodeJson, type Hello, type Message, type Welcome } from './messages.js';
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
  settling: { settled: 'streaming', fail: 'closing', closed: 'closed' },
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
  | { type: 'log'; level: LogLevel; msg: string; fields?: Record<string, unknown> };

export interface ReplicaIdentity {
  volumeId: string;
  size: number;
  regionSize: number;
}

export class SecondarySession {
  private linkState: SecondaryLinkState = 'awaitingHello';
  private readonly actions: SecondarySessionAction[] = [];
  private outbox: Buffer[] = [];
  private readonly queue = new ChunkQueue();
  private readonly decoder = new FrameDecoder();
  private readonly helloDeadlineMs: number;
  private lastHeardMs: number;
  private lastAckSent: ReplicaState | undefined;

  constructor(
    private readonly replica: ReplicaIdentity,
    now: number,
  ) {
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

  /** The applier is idle: `state` is durable. Welcome the primary with it and start the stream. */
  handleSettled(state: ReplicaState): void {
    if (this.linkState !== 'settling') return;
    this.move('settled');
    const welcome: Welcome = { ...this.replica, role: 'secondary', ...state };
    this.lastAckSent = { ...state };
    this.send('welcome', [encodeJson(welcome)]);
    this.log('info', 'primary connected', { ...state });
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
      this.send('refuse', [Buffer.from(why)]);
      this.emit({ type: 'end', reason: why });
      return;
    }
    this.move('hello');
    this.emit({ type: 'accepted' });
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
