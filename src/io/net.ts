/** The transport over node:net: TCP connections to and from the peer (plaintext; TLS in tls.ts). */
import net from 'node:net';
import tls from 'node:tls';
import { StagedWriter } from './staged-writes.js';
import type { Connection, ConnectionEvents, Dialer } from './transport.js';

/** Wraps a socket; `events` get its data and its close (with the last error seen as the reason). */
export function socketConnection(socket: net.Socket, events: ConnectionEvents): Connection {
  let reason = 'connection closed';
  socket.on('connect', () => events.open());
  socket.on('data', (chunk: Buffer) => events.data(chunk));
  socket.on('error', (err: Error & { library?: unknown; reason?: unknown }) => {
    // An OpenSSL error's message carries an address and a source path; its `reason` is for people.
    reason =
      typeof err.library === 'string' && typeof err.reason === 'string' ? `TLS: ${err.reason}` : err.message;
  });
  socket.on('close', () => events.close(reason, false));
  const remote = `${socket.remoteAddress}:${socket.remotePort}`;
  // Plaintext: a corked writev hands the kernel the buffers as they are. TLS: see staged-writes.ts.
  const staged = socket instanceof tls.TLSSocket ? new StagedWriter(socket) : undefined;
  return {
    get remote() {
      return socket.remoteAddress === undefined ? remote : `${socket.remoteAddress}:${socket.remotePort}`;
    },
    secure: false,
    peerFingerprint: null,
    write(buffers) {
      if (socket.destroyed) return;
      if (staged) return staged.write(buffers);
      socket.cork();
      for (const b of buffers) socket.write(b);
      socket.uncork();
    },
    close(why) {
      reason = why;
      socket.destroy();
    },
    end(why) {
      reason = why;
      if (staged) staged.end();
      else socket.end();
      // A peer that never reads our last word must not keep the socket open.
      setTimeout(() => socket.destroy(), 1000).unref();
    },
    pause: () => socket.pause(),
    resume: () => socket.resume(),
  };
}

export function tcpDialer(host: string, port: number): Dialer {
  return {
    peer: `${host}:${port}`,
    dial(events) {
      return socketConnection(net.connect({ host, port, noDelay: true }), events);
    },
  };
}
