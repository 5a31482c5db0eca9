/**
 * Server-side TLS handshakes on sockets accepted elsewhere (the replication listener, an NBD
 * connection after NBD_OPT_STARTTLS). The handshake runs in a `tls.Server` that never listens:
 * only a TLS socket a `tls.Server` made has its peer's chain checked against the CA (a socket
 * made with `new tls.TLSSocket` reports `authorized: false` whatever the peer sent). The server
 * hands its sockets back by event, so each waiting handshake is found again by its address pair,
 * which the raw socket and the TLS socket made from it share.
 */
import type net from 'node:net';
import tls from 'node:tls';

export interface HandshakeOutcome {
  /** The handshake finished: judge the peer (`authorized`, its certificate) and use the socket. */
  secure(socket: tls.TLSSocket): void;
  /** The handshake failed (the socket is destroyed afterwards). */
  failed(err: Error & { code?: string; reason?: string }): void;
}

export class TlsAcceptor {
  private readonly server: tls.Server;
  private readonly waiting = new Map<string, HandshakeOutcome>();

  /** `options`: key, cert, CA, versions, requestCert. Peers are never rejected here: the caller judges. */
  constructor(options: tls.TlsOptions) {
    this.server = tls.createServer({
      ...options,
      rejectUnauthorized: false, // the caller refuses, and says why
      handshakeTimeout: 0, // node's is an idle timeout; callers keep an absolute deadline
    });
    this.server.on('secureConnection', (socket: tls.TLSSocket) => {
      const outcome = this.take(socket);
      if (outcome === undefined) socket.destroy();
      else outcome.secure(socket);
    });
    this.server.on('tlsClientError', (err: Error, socket: tls.TLSSocket) => {
      // A peer that went away mid-handshake was forgotten on its close: nothing to report.
      this.take(socket)?.failed(err);
      socket.destroy();
    });
  }

  /**
   * Starts the handshake on `raw` (nothing else may read it any more). One of `outcome`'s calls
   * follows, unless the connection closes first.
   */
  accept(raw: net.Socket, outcome: HandshakeOutcome): void {
    const key = addressPair(raw);
    this.waiting.set(key, outcome);
    raw.once('close', () => {
      if (this.waiting.get(key) === outcome) this.waiting.delete(key);
    });
    this.server.emit('connection', raw);
  }

  private take(socket: net.Socket): HandshakeOutcome | undefined {
    const key = addressPair(socket);
    const outcome = this.waiting.get(key);
    this.waiting.delete(key);
    return outcome;
  }
}

/** "remote local": a TCP connection's identity while it is open. */
function addressPair(socket: net.Socket): string {
  return `${socket.remoteAddress}:${socket.remotePort} ${socket.localAddress}:${socket.localPort}`;
}
