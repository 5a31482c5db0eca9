/**
 * The NBD server: accepts connections, runs the negotiation, then serves requests from a
 * BlockDevice with many requests in flight per connection and replies sent as each completes
 * (batched per event-loop turn with cork/uncork). A malformed handshake or frame closes that
 * connection only.
 */
import net from 'node:net';
import type { Logger } from 'pino';
import type { BlockDevice } from '../io/block-device.js';
import { ChunkQueue } from '../io/chunk-queue.js';
import { adoptWithPooledReads, ReceiveSlabs } from '../io/receive-slabs.js';
import type { TlsAcceptor } from '../io/tls-acceptor.js';
import { type ExportInfo, Handshake, type NbdTlsMode, type NegotiatedSession } from './handshake.js';
import * as P from './protocol.js';
import { encodeBlockStatus, encodeReply, readReplyPrefixBytes, writeReadReplyPrefix } from './replies.js';
import { type Request, RequestParser } from './requests.js';

/** Requests in flight per connection before we stop reading from it (backpressure). */
export const IN_FLIGHT_REQUESTS_MAX = 256;
/** Bytes of READ and WRITE requests in flight per connection before we stop reading from it. */
export const IN_FLIGHT_BYTES_MAX = 64 * 1024 * 1024;
/** Reply bytes queued on a socket before we stop reading more requests from that client. */
export const REPLY_BACKLOG_BYTES_MAX = 64 * 1024 * 1024;
/** A client that has not finished negotiating within this time is disconnected. */
export const HANDSHAKE_TIMEOUT_MS = 30_000;
/** After our last reply on close, how long the client has to close its side. */
export const CLOSE_GRACE_MS = 1_000;

export interface RequestStats {
  /** Called once per request with its command, its payload or data bytes, and its NBD error (0 = ok). */
  record(command: number, bytes: number, error: number): void;
}

export interface NbdServerOptions {
  exportName: string;
  description?: string;
  logger: Logger;
  stats?: RequestStats;
  /** NBD_OPT_STARTTLS: off (refused), on (the client's choice), require (nothing else before it). */
  tls?: NbdTls;
}

export interface NbdTls {
  mode: NbdTlsMode;
  /** Handshakes with the server's certificate and key (and the CA client certificates need, if any). */
  acceptor: TlsAcceptor;
  /** Client certificates are required and must verify against that CA. */
  requireClientCert: boolean;
}

export class NbdServer {
  private readonly server: net.Server;
  private readonly connections = new Set<Connection>();
  private shuttingDown = false;
  readonly exportInfo: ExportInfo;
  /**
   * Connections read into reused memory (receive-slabs.ts) where the device says when it lets go
   * of a write's data, and the connection cannot turn into TLS (which reads for itself).
   */
  readonly pooledReads: boolean;
  /** Connections that did read into receive slabs (where node let the socket be moved). */
  pooledConnections = 0;
  /** Receive slabs allocated by all connections so far (each connection reuses its own). */
  slabsAllocated = 0;

  constructor(
    private readonly device: BlockDevice,
    private readonly opts: NbdServerOptions,
  ) {
    let flags =
      P.TFLAG_HAS_FLAGS | P.TFLAG_SEND_FLUSH | P.TFLAG_SEND_FUA | P.TFLAG_SEND_DF | P.TFLAG_CAN_MULTI_CONN;
    if (device.readOnly) flags |= P.TFLAG_READ_ONLY;
    else flags |= P.TFLAG_SEND_TRIM | P.TFLAG_SEND_WRITE_ZEROES;
    this.exportInfo = {
      name: opts.exportName,
      description: opts.description ?? 'volrep volume',
      size: device.size,
      flags,
    };
    this.pooledReads = device.reportsRelease === true && (opts.tls?.mode ?? 'off') === 'off';
    this.server = net.createServer({ noDelay: true, pauseOnConnect: this.pooledReads }, (socket) =>
      this.accept(socket),
    );
  }

  get connectionCount(): number {
    return this.connections.size;
  }

  listen(host: string, port: number): Promise<net.AddressInfo> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen({ host, port, exclusive: true }, () => {
        this.server.off('error', reject);
        this.server.on('error', (err) => this.opts.logger.error({ err }, 'nbd listener error'));
        resolve(this.server.address() as net.AddressInfo);
      });
    });
  }

  /** Stops accepting, lets every connection finish the requests it has, then closes them. */
  async close(): Promise<void> {
    this.shuttingDown = true;
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    await Promise.all([...this.connections].map((c) => c.drainAndClose()));
    await closed;
  }

  private accept(accepted: net.Socket): void {
    const log = this.opts.logger.child({ client: `${accepted.remoteAddress}:${accepted.remotePort}` });
    if (this.shuttingDown) {
      accepted.destroy();
      return;
    }
    let socket = accepted;
    let slabs: ReceiveSlabs | undefined;
    let connection: Connection | undefined;
    if (this.pooledReads) {
      slabs = new ReceiveSlabs(() => this.slabsAllocated++);
      const adopted = adoptWithPooledReads(accepted, slabs, (chunk) => connection?.receive(chunk));
      if (adopted === undefined) {
        slabs = undefined;
        accepted.resume();
      } else {
        socket = adopted;
        this.pooledConnections++;
      }
    }
    connection = new Connection(
      socket,
      this.device,
      this.exportInfo,
      log,
      this.opts.stats,
      () => this.shuttingDown,
      this.opts.tls,
      slabs,
    );
    this.connections.add(connection);
    socket.once('close', () => this.connections.delete(connection));
  }
}

type Phase = 'handshake' | 'transmission' | 'closing';

class Connection {
  /** The stream requests and replies go over: the TCP socket, or the TLS socket after STARTTLS. */
  private socket: net.Socket;
  private readonly queue: ChunkQueue;
  private phase: Phase = 'handshake';
  private readonly handshake: Handshake;
  private parser: RequestParser | undefined;
  private session: NegotiatedSession = { structuredReplies: false, baseAllocationId: 0 };
  private inFlight = 0;
  private inFlightBytes = 0;
  private corked = false;
  private paused = false;
  private resumeCheckQueued = false;
  private readonly handshakeTimer: NodeJS.Timeout;
  private onIdle: (() => void) | undefined;

  /** Every chunk read from the client (from 'data' events, or from reads into receive slabs). */
  readonly receive = (chunk: Buffer) => {
    // A closing connection reads only to see the client's end; what it sends is dropped.
    if (this.phase === 'closing') {
      this.slabs?.dropChunk(chunk);
      return;
    }
    this.queue.push(chunk);
    this.pump();
  };
  private readonly onDrain = () => this.maybeResume();

  constructor(
    socket: net.Socket,
    private readonly device: BlockDevice,
    exportInfo: ExportInfo,
    private readonly log: Logger,
    private readonly stats: RequestStats | undefined,
    isShuttingDown: () => boolean,
    private readonly tlsConfig: NbdTls | undefined,
    /** Where the socket reads into, when it reads into reused memory (and emits no 'data'). */
    private readonly slabs: ReceiveSlabs | undefined,
  ) {
    this.socket = socket;
    this.queue = new ChunkQueue(slabs && ((chunk) => slabs.dropChunk(chunk)));
    this.handshake = new Handshake(exportInfo, isShuttingDown, tlsConfig?.mode ?? 'off');
    this.handshakeTimer = setTimeout(() => this.abort('negotiation timed out'), HANDSHAKE_TIMEOUT_MS);
    if (slabs === undefined) socket.on('data', this.receive);
    socket.on('error', (err) => log.debug({ err }, 'nbd socket error'));
    socket.on('close', () => {
      clearTimeout(this.handshakeTimer);
      this.phase = 'closing';
      this.onIdle?.();
    });
    socket.on('drain', this.onDrain);
    this.send(this.handshake.greeting());
    log.debug('nbd client connected');
  }

  /**
   * Finishes requests already received, then closes; used on DISC and on server shutdown. Bytes
   * that arrive meanwhile are read and dropped (not parsed), so the socket can see the client's
   * end; a client that does not close its side within CLOSE_GRACE_MS is cut off.
   */
  drainAndClose(): Promise<void> {
    if (this.socket.destroyed) return Promise.resolve();
    if (this.phase === 'handshake') {
      this.socket.destroy();
      return Promise.resolve();
    }
    this.phase = 'closing';
    this.paused = false;
    this.socket.resume();
    return new Promise((resolve) => {
      this.socket.once('close', () => resolve());
      const finish = () => {
        this.onIdle = undefined;
        this.socket.end();
        setTimeout(() => this.socket.destroy(), CLOSE_GRACE_MS).unref();
      };
      if (this.inFlight === 0) finish();
      else this.onIdle = finish;
    });
  }

  private pump(): void {
    if (this.phase === 'handshake') {
      const { output, outcome } = this.handshake.receive(this.queue);
      for (const buf of output) this.send(buf);
      if (outcome === undefined) return;
      if (outcome.kind === 'starttls') {
        this.startTls();
        return;
      }
      clearTimeout(this.handshakeTimer);
      if (outcome.kind === 'close') {
        if (outcome.clientError) this.log.warn({ reason: outcome.reason }, 'nbd negotiation refused');
        this.closeAfterReplies();
        return;
      }
      this.session = outcome.session;
      this.parser = new RequestParser({
        size: this.device.size,
        readOnly: this.device.readOnly,
        structuredReplies: outcome.session.structuredReplies,
        baseAllocationId: outcome.session.baseAllocationId,
      });
      this.phase = 'transmission';
      this.slabs?.negotiated();
      this.log.debug({ structured: outcome.session.structuredReplies }, 'nbd transmission phase');
    }
    while (this.phase === 'transmission' && !this.paused) {
      const event = this.parser!.next(this.queue);
      if (event === undefined) break;
      if (event.kind === 'fatal') {
        this.abort(event.reason);
        return;
      }
      if (event.kind === 'rejected') {
        this.stats?.record(event.request.command, 0, event.error);
        this.log.debug({ command: event.request.command, reason: event.message }, 'nbd request rejected');
        this.send(
          encodeReply(event.request.handle, event.error, this.session.structuredReplies, event.message),
        );
        continue;
      }
      this.execute(event.request);
      if (
        this.inFlight >= IN_FLIGHT_REQUESTS_MAX ||
        this.inFlightBytes >= IN_FLIGHT_BYTES_MAX ||
        this.heldReceiveBytes() >= IN_FLIGHT_BYTES_MAX ||
        this.socket.writableLength > REPLY_BACKLOG_BYTES_MAX
      ) {
        this.paused = true;
        this.socket.pause();
      }
    }
  }

  private maybeResume(): void {
    if (!this.paused || this.phase !== 'transmission') return;
    if (
      this.inFlight < IN_FLIGHT_REQUESTS_MAX / 2 &&
      this.heldReceiveBytes() <= IN_FLIGHT_BYTES_MAX / 2 &&
      this.socket.writableLength <= REPLY_BACKLOG_BYTES_MAX / 2
    ) {
      this.paused = false;
      this.socket.resume();
      this.pump();
    }
  }

  /**
   * Receive memory that writes the device has not let go of keep (a small write keeps its whole
   * slab): bounded like the bytes in flight. Only such writes hold much of it (the queue holds a
   * read or two), so a connection paused for it resumes as the device lets go (`released`).
   */
  private heldReceiveBytes(): number {
    return this.slabs?.heldBytes ?? 0;
  }

  private execute(req: Request): void {
    const fua = (req.flags & P.CMD_FLAG_FUA) !== 0;
    const structured = this.session.structuredReplies;
    switch (req.command) {
      case P.CMD_READ: {
        const prefix = readReplyPrefixBytes(structured);
        const buf = Buffer.allocUnsafe(prefix + req.length);
        this.begin(req);
        this.device.read(req.offset, req.length, buf, prefix, (err) => {
          if (err) return this.fail(req, err);
          writeReadReplyPrefix(buf, req.handle, req.offset, req.length, structured);
          this.complete(req, req.length, buf);
        });
        return;
      }
      case P.CMD_WRITE:
        this.begin(req);
        // Its views of the receive slabs stay put until the device lets go of them (then reused),
        // which may be after the write completed (a replicating primary sends them on); where
        // some I/O may still read them, those slabs are never reused.
        this.slabs?.hold(req.payload);
        this.device.write(
          req.offset,
          req.payload,
          req.length,
          fua,
          (err) => (err ? this.fail(req, err) : this.complete(req, req.length)),
          this.slabs && ((reusable) => this.released(req.payload, reusable)),
        );
        return;
      case P.CMD_WRITE_ZEROES:
        this.begin(req);
        this.device.writeZeroes(req.offset, req.length, fua, (err) =>
          err ? this.fail(req, err) : this.complete(req, req.length),
        );
        return;
      case P.CMD_TRIM:
        this.begin(req);
        this.device.trim(req.offset, req.length, fua, (err) =>
          err ? this.fail(req, err) : this.complete(req, req.length),
        );
        return;
      case P.CMD_FLUSH:
        this.begin(req);
        this.device.flush((err) => (err ? this.fail(req, err) : this.complete(req, 0)));
        return;
      case P.CMD_BLOCK_STATUS: {
        this.begin(req);
        const length = Math.min(req.length, this.device.size - req.offset);
        this.complete(req, 0, encodeBlockStatus(req.handle, this.session.baseAllocationId, length));
        return;
      }
      case P.CMD_DISC:
        this.stats?.record(req.command, 0, 0);
        this.log.debug('nbd client disconnecting');
        void this.drainAndClose();
        return;
    }
  }

  private begin(req: Request): void {
    this.inFlight++;
    if (req.command === P.CMD_READ || req.command === P.CMD_WRITE) this.inFlightBytes += req.length;
  }

  private end(req: Request): void {
    this.inFlight--;
    if (req.command === P.CMD_READ || req.command === P.CMD_WRITE) this.inFlightBytes -= req.length;
  }

  private complete(req: Request, bytes: number, reply?: Buffer): void {
    this.end(req);
    this.stats?.record(req.command, bytes, 0);
    this.send(reply ?? encodeReply(req.handle, 0, this.session.structuredReplies));
    this.settled();
  }

  private fail(req: Request, err: Error): void {
    this.end(req);
    const code = (err as NodeJS.ErrnoException).code === 'ENOSPC' ? P.ENOSPC : P.EIO;
    this.log.error(
      { err, command: req.command, offset: req.offset, length: req.length },
      'nbd request failed',
    );
    this.stats?.record(req.command, 0, code);
    this.send(encodeReply(req.handle, code, this.session.structuredReplies, err.message));
    this.settled();
  }

  /**
   * The device lets go of a write's payload. Only bookkeeping here (the device may call this from
   * inside its own calls): a connection paused for held memory looks again on the next tick.
   */
  private released(payload: Buffer[], reusable: boolean): void {
    if (reusable) this.slabs?.release(payload);
    else this.slabs?.abandon(payload);
    if (this.paused && !this.resumeCheckQueued) {
      this.resumeCheckQueued = true;
      process.nextTick(() => {
        this.resumeCheckQueued = false;
        this.maybeResume();
      });
    }
  }

  private settled(): void {
    if (this.inFlight === 0 && this.onIdle) this.onIdle();
    else this.maybeResume();
  }

  /** Queues bytes for the client; everything sent in one event-loop turn leaves in one write. */
  private send(buf: Buffer): void {
    if (this.socket.destroyed || this.socket.writableEnded) return;
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      process.nextTick(() => {
        this.corked = false;
        this.socket.uncork();
      });
    }
    this.socket.write(buf);
  }

  /**
   * NBD_OPT_STARTTLS was accepted: the ACK goes out in the clear, then the socket becomes a TLS
   * server socket and the negotiation goes on over it. The client must not have sent anything
   * after the option (it waits for the reply); if it did, that is a protocol error.
   */
  private startTls(): void {
    const raw = this.socket;
    const config = this.tlsConfig!;
    if (this.queue.length > 0) return this.abort('data after NBD_OPT_STARTTLS before its reply');
    raw.off('data', this.receive);
    raw.off('drain', this.onDrain);
    raw.pause();
    if (this.corked) {
      this.corked = false;
      raw.uncork();
    }
    // Only once the ACK has left may TLS take the socket over (its handshake bytes come after).
    raw.write(Buffer.alloc(0), () => {
      if (raw.destroyed) return;
      config.acceptor.accept(raw, {
        secure: (secure) => {
          if (config.requireClientCert && !secure.authorized) {
            const reason =
              secure.getPeerX509Certificate() === undefined
                ? 'the client presented no certificate'
                : `its certificate is not signed by the --nbd-tls-ca (${String(secure.authorizationError)})`;
            this.log.warn({ reason }, 'nbd TLS client refused');
            secure.destroy();
            return;
          }
          secure.on('error', (err) => this.log.debug({ reason: err.message }, 'nbd TLS connection error'));
          this.socket = secure;
          secure.on('data', this.receive);
          secure.on('drain', this.onDrain);
          this.handshake.tlsStarted();
          this.log.debug({ protocol: secure.getProtocol() }, 'nbd connection upgraded to TLS');
          this.pump();
        },
        failed: (err) =>
          this.log.warn({ reason: err.reason ?? err.message.trim() }, 'nbd TLS handshake failed'),
      });
    });
  }

  /** A protocol error: replies already queued still go out, then the connection closes. */
  private abort(reason: string): void {
    this.log.warn({ reason }, 'nbd connection closed: protocol error');
    this.closeAfterReplies();
  }

  private closeAfterReplies(): void {
    this.phase = 'closing';
    this.queue.discard(this.queue.length);
    this.socket.end();
    setTimeout(() => this.socket.destroy(), CLOSE_GRACE_MS).unref();
  }
}
