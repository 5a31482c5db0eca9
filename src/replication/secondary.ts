/**
 * The secondary's end of the replication link: one primary at a time. It checks the primary's
 * hello (volume id, size, region size), answers with what is durable on the replica, then feeds
 * the stream to the Applier and sends back its acks. Anything malformed closes the connection
 * with a logged reason; the replica's durable state is never affected by a bad frame.
 */
import net from 'node:net';
import type { Logger } from 'pino';
import { ChunkQueue } from '../nbd/chunks.js';
import type { Meta } from '../volume/meta.js';
import type { Applier } from './applier.js';
import { encodeFrame, FrameDecoder } from './frames.js';
import { decodeMessage, encodeId, encodeJson, type Welcome } from './messages.js';

/** A primary that has not said hello within this time is disconnected. */
export const HELLO_TIMEOUT_MS = 10_000;
/** Bytes of updates received but not yet applied before we stop reading (backpressure). */
export const APPLY_BACKLOG_BYTES_MAX = 64 * 1024 * 1024;
/** With no frame from the primary for this long (it sends keep-alives), the link is dead. */
export const PEER_SILENCE_MS_MAX = 30_000;

export interface SecondaryLinkOptions {
  meta: Meta;
  applier: Applier;
  logger: Logger;
  onAckSent?: () => void;
}

export type SecondaryPeerState = 'waiting' | 'connected';

export class SecondaryLink {
  private readonly server: net.Server;
  private current: net.Socket | undefined;
  peerAddress: string | undefined;

  constructor(private readonly opts: SecondaryLinkOptions) {
    this.server = net.createServer({ noDelay: true }, (socket) => this.accept(socket));
  }

  get peerState(): SecondaryPeerState {
    return this.current ? 'connected' : 'waiting';
  }

  listen(host: string, port: number): Promise<net.AddressInfo> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen({ host, port, exclusive: true }, () => {
        this.server.off('error', reject);
        this.server.on('error', (err) => this.opts.logger.error({ err }, 'replication listener error'));
        resolve(this.server.address() as net.AddressInfo);
      });
    });
  }

  async close(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    this.current?.destroy();
    await closed;
    await this.opts.applier.whenIdle();
  }

  private accept(socket: net.Socket): void {
    const peer = `${socket.remoteAddress}:${socket.remotePort}`;
    const log = this.opts.logger.child({ peer });
    socket.on('error', (err) => log.debug({ err }, 'replication socket error'));
    const applier = this.opts.applier;
    const queue = new ChunkQueue();
    const decoder = new FrameDecoder();
    let greeted = false;
    let silenceTimer: NodeJS.Timeout = setTimeout(() => drop('no hello in time'), HELLO_TIMEOUT_MS);
    const send = (buffers: Buffer[]) => {
      if (!socket.destroyed) socket.write(buffers.length === 1 ? buffers[0] : Buffer.concat(buffers));
    };
    const drop = (reason: string) => {
      log.warn({ reason }, 'replication connection closed');
      socket.destroy();
    };
    const refuse = (reason: string) => {
      log.warn({ reason }, 'refused primary');
      socket.end(Buffer.concat(encodeFrame('refuse', [Buffer.from(reason)])));
    };
    socket.once('close', () => {
      clearTimeout(silenceTimer);
      if (this.current === socket) {
        this.current = undefined;
        this.peerAddress = undefined;
        applier.onAck = () => {};
      }
      log.info('primary disconnected');
    });

    const onFrames = () => {
      for (;;) {
        const result = decoder.next(queue);
        if (result === undefined) break;
        if (result.kind === 'error') return drop(result.reason);
        const message = decodeMessage(result.frame);
        if (message.type === 'invalid') return drop(message.reason);
        clearTimeout(silenceTimer);
        silenceTimer = setTimeout(() => drop('primary silent for too long'), PEER_SILENCE_MS_MAX);
        if (!greeted) {
          if (message.type !== 'hello') return drop(`expected hello, got ${message.type}`);
          const { meta } = this.opts;
          const h = message.hello;
          if (h.volumeId !== meta.volumeId) {
            return refuse(
              `volume id mismatch: primary has ${h.volumeId}, this replica belongs to ${meta.volumeId}`,
            );
          }
          if (h.size !== meta.size)
            return refuse(`size mismatch: primary ${h.size} bytes, replica ${meta.size} bytes`);
          if (h.regionSize !== meta.regionSize) {
            return refuse(`region size mismatch: primary ${h.regionSize}, replica ${meta.regionSize}`);
          }
          greeted = true;
          // The newest primary connection wins: after a silent link cut the old one may linger
          // here long after the primary gave up on it and reconnected.
          if (this.current && this.current !== socket) {
            log.warn('a new connection from the primary replaces the previous one');
            this.current.destroy();
          }
          this.current = socket;
          this.peerAddress = peer;
          socket.pause();
          // Report only what is durable: let the applier finish what an earlier link left.
          void applier.whenIdle().then(() => {
            if (socket.destroyed) return;
            if (applier.failed) return refuse(`replica failed: ${applier.failed.message}`);
            const state = applier.state;
            const welcome: Welcome = {
              volumeId: meta.volumeId,
              size: meta.size,
              regionSize: meta.regionSize,
              role: 'secondary',
              lastAppliedUpdate: state.lastAppliedUpdate,
              consistent: state.consistent,
            };
            applier.onAck = (id) => {
              send(encodeFrame('ack', [encodeId(id)]));
              this.opts.onAckSent?.();
            };
            applier.onFailure = (err) => drop(`replica write failed: ${err.message}`);
            send(encodeFrame('welcome', [encodeJson(welcome)]));
            log.info(
              { lastAppliedUpdate: state.lastAppliedUpdate, consistent: state.consistent },
              'primary connected',
            );
            socket.resume();
            onFrames();
          });
          return;
        }
        let problem: string | undefined;
        switch (message.type) {
          case 'update':
            problem = applier.push({ kind: 'update', update: message.update, data: message.data });
            break;
          case 'barrier':
            problem = applier.push({ kind: 'barrier' });
            break;
          case 'resyncBegin':
            problem = applier.push({ kind: 'resyncBegin' });
            break;
          case 'resyncEnd':
            problem = applier.push({ kind: 'resyncEnd' });
            break;
          case 'keepAlive':
            send(encodeFrame('keepAlive'));
            break;
          default:
            problem = `unexpected ${message.type} from the primary`;
        }
        if (problem) return drop(problem);
        if (applier.queuedBytes > APPLY_BACKLOG_BYTES_MAX && !socket.isPaused()) {
          socket.pause();
          void applier.whenIdle().then(() => {
            if (!socket.destroyed) {
              socket.resume();
              onFrames();
            }
          });
          return;
        }
      }
    };
    socket.on('data', (chunk: Buffer) => {
      queue.push(chunk);
      if (!socket.isPaused()) onFrames();
    });
  }
}
