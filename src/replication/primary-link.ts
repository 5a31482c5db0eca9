/**
 * The primary's end of the replication link: connects to the secondary (reconnecting with capped
 * exponential backoff), says hello, learns what is durable on the replica, then carries the
 * ordered update stream out and cumulative acks back. It knows nothing about regions or the log:
 * it reports `connected`, `acked` and `disconnected` to its owner, which drives the engine.
 */
import net from 'node:net';
import type { Logger } from 'pino';
import { ChunkQueue } from '../nbd/chunks.js';
import type { HostPort } from '../util/address.js';
import { encodeFrame, FrameDecoder } from './frames.js';
import {
  decodeMessage,
  encodeId,
  encodeJson,
  encodeUpdateHeader,
  UPDATE_FLAG_RESYNC,
  type UpdateHeader,
  type Welcome,
} from './messages.js';

export const RECONNECT_DELAY_MS_MIN = 100;
export const RECONNECT_DELAY_MS_MAX = 5_000;
/** Without any frame from the secondary for this long while connected, a keep-alive goes out. */
export const KEEP_ALIVE_INTERVAL_MS = 1_000;
/** Default for how long the secondary (which answers every keep-alive) may be silent. */
export const PEER_SILENCE_MS_MAX = 5_000;
/** Covers the TCP connect and the hello/welcome exchange: a secondary that never answers is dropped. */
export const CONNECT_TIMEOUT_MS = 5_000;

export type LinkState = 'connecting' | 'connected' | 'disconnected';

export interface PrimaryLinkEvents {
  /** The secondary accepted us; `welcome` says what is durable there. */
  connected(welcome: Welcome): void;
  /** All updates with id ≤ `id` are durable on the replica. */
  acked(id: number): void;
  /** The link is down (reason for the log); everything in flight is lost. */
  disconnected(reason: string): void;
  /** The secondary refused us for a reason that retrying will not fix (wrong volume). */
  refused?(reason: string): void;
}

export interface PrimaryLinkOptions {
  peer: HostPort;
  hello: { volumeId: string; size: number; regionSize: number };
  logger: Logger;
  events: PrimaryLinkEvents;
  /** No frame at all from the secondary for this long means the link is dead (the ack timeout). */
  silenceMsMax?: number;
}

export class PrimaryLink {
  private socket: net.Socket | undefined;
  private linkState: LinkState = 'disconnected';
  private stopped = false;
  private delayMs = RECONNECT_DELAY_MS_MIN;
  private retryTimer: NodeJS.Timeout | undefined;
  private keepAliveTimer: NodeJS.Timeout | undefined;
  reconnects = 0;
  sentBytes = 0;

  constructor(private readonly opts: PrimaryLinkOptions) {}

  get state(): LinkState {
    return this.linkState;
  }

  start(): void {
    this.connect();
  }

  /** Sends an update (the data views are written as they are, without copying). */
  sendUpdate(update: UpdateHeader, data: Buffer[]): boolean {
    const flags = update.resync ? UPDATE_FLAG_RESYNC : 0;
    return this.write(encodeFrame('update', [encodeUpdateHeader(update), ...data], flags));
  }

  sendBarrier(lastId: number): boolean {
    return this.write(encodeFrame('barrier', [encodeId(lastId)]));
  }

  sendResyncBegin(id: number): boolean {
    return this.write(encodeFrame('resyncBegin', [encodeId(id)]));
  }

  sendResyncEnd(id: number): boolean {
    return this.write(encodeFrame('resyncEnd', [encodeId(id)]));
  }

  /** Drops the current connection (e.g. on ack timeout); a reconnect follows. */
  drop(reason: string): void {
    if (this.socket && !this.socket.destroyed) {
      this.opts.logger.warn({ reason }, 'dropping replication link');
      this.socket.destroy(new Error(reason));
    }
  }

  stop(): Promise<void> {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    clearInterval(this.keepAliveTimer);
    const socket = this.socket;
    if (!socket || socket.destroyed) return Promise.resolve();
    return new Promise((resolve) => {
      socket.once('close', () => resolve());
      socket.end();
      setTimeout(() => socket.destroy(), 1000).unref();
    });
  }

  private write(buffers: Buffer[]): boolean {
    const socket = this.socket;
    if (this.linkState !== 'connected' || !socket || socket.destroyed) return false;
    for (const b of buffers) {
      socket.write(b);
      this.sentBytes += b.length;
    }
    return true;
  }

  private connect(): void {
    if (this.stopped) return;
    const { logger, peer, events } = this.opts;
    this.linkState = 'connecting';
    const socket = net.connect({ host: peer.host, port: peer.port, noDelay: true });
    this.socket = socket;
    const queue = new ChunkQueue();
    const decoder = new FrameDecoder();
    let welcomed = false;
    let lastHeardMs = performance.now();
    let closeReason = 'connection closed';
    const welcomeTimer = setTimeout(
      () => socket.destroy(new Error('no welcome from the secondary in time')),
      CONNECT_TIMEOUT_MS,
    );
    socket.on('connect', () => {
      socket.write(
        Buffer.concat(encodeFrame('hello', [encodeJson({ ...this.opts.hello, role: 'primary' })])),
      );
    });
    socket.on('error', (err) => {
      closeReason = err.message;
    });
    socket.on('data', (chunk: Buffer) => {
      lastHeardMs = performance.now();
      queue.push(chunk);
      for (;;) {
        const result = decoder.next(queue);
        if (result === undefined) return;
        if (result.kind === 'error') return socket.destroy(new Error(result.reason));
        const message = decodeMessage(result.frame);
        if (message.type === 'invalid') return socket.destroy(new Error(message.reason));
        if (!welcomed) {
          if (message.type === 'refuse') {
            closeReason = `refused by the secondary: ${message.reason}`;
            logger.error({ reason: message.reason }, 'secondary refused this primary');
            events.refused?.(message.reason);
            return socket.destroy();
          }
          if (message.type !== 'welcome')
            return socket.destroy(new Error(`expected welcome, got ${message.type}`));
          welcomed = true;
          clearTimeout(welcomeTimer);
          this.linkState = 'connected';
          this.delayMs = RECONNECT_DELAY_MS_MIN;
          this.keepAliveTimer = setInterval(() => {
            // A link that died silently while idle would otherwise look connected until the next write.
            if (performance.now() - lastHeardMs > (this.opts.silenceMsMax ?? PEER_SILENCE_MS_MAX)) {
              socket.destroy(new Error('secondary silent for too long'));
              return;
            }
            this.write(encodeFrame('keepAlive'));
          }, KEEP_ALIVE_INTERVAL_MS);
          logger.info({ peer: `${peer.host}:${peer.port}`, ...message.welcome }, 'connected to secondary');
          events.connected(message.welcome);
          continue;
        }
        if (message.type === 'ack') events.acked(message.id);
        else if (message.type !== 'keepAlive') return socket.destroy(new Error(`unexpected ${message.type}`));
      }
    });
    socket.on('close', () => {
      clearTimeout(welcomeTimer);
      clearInterval(this.keepAliveTimer);
      if (this.socket === socket) this.socket = undefined;
      const wasConnected = this.linkState === 'connected';
      this.linkState = 'disconnected';
      if (wasConnected) {
        if (this.stopped) logger.debug('replication link closed');
        else logger.warn({ reason: closeReason }, 'replication link down');
        events.disconnected(closeReason);
      } else {
        logger.debug({ reason: closeReason }, 'could not connect to secondary');
      }
      if (this.stopped) return;
      if (wasConnected) this.reconnects++;
      this.retryTimer = setTimeout(() => this.connect(), this.delayMs);
      this.delayMs = Math.min(this.delayMs * 2, RECONNECT_DELAY_MS_MAX);
    });
  }
}
