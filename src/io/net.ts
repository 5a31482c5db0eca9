/** The transport over node:net: TCP connections to and from the peer (plaintext; TLS in tls.ts). */
import net from 'node:net';
import tls from 'node:tls';
import { ReceiveSlabs, readIntoSlabs } from './receive-slabs.js';
import { StagedWriter } from './staged-writes.js';
import type { Connection, ConnectionEvents, Dialer, Written } from './transport.js';

/** Wraps a socket; `events` get its data and its close (with the last error seen as the reason). */
export function socketConnection(socket: net.Socket, events: ConnectionEvents): Connection {
  let reason = 'connection closed';
  socket.on('connect', () => events.open());
  /** Asked for by the owner: from a read with nothing buffered before it on, chunks are slab views. */
  let slabs: ReceiveSlabs | undefined;
  let slabReads = false;
  socket.on('data', (chunk: Buffer) => {
    events.data(chunk);
    if (slabs !== undefined && !slabReads && !socket.destroyed && socket.readableLength === 0)
      slabReads = readIntoSlabs(socket, slabs, (c) => events.data(c));
  });
  socket.on('error', (err: Error & { library?: unknown; reason?: unknown }) => {
    // An OpenSSL error's message carries an address and a source path; its `reason` is for people.
    reason =
      typeof err.library === 'string' && typeof err.reason === 'string' ? `TLS: ${err.reason}` : err.message;
  });
  // Plaintext: a corked writev hands the kernel the buffers as they are. TLS: see staged-writes.ts.
  const staged = socket instanceof tls.TLSSocket ? new StagedWriter(socket) : undefined;
  /**
   * Plaintext writes whose `written` is still owed. Node calls a write's callback even when the
   * socket is destroyed, once libuv is done with it; at 'close' (after every write was completed
   * or cancelled) nothing reads them any more: this is the guard.
   */
  const unwritten = new Set<Written>();
  socket.on('close', () => {
    staged?.abandon();
    for (const written of [...unwritten]) written();
    unwritten.clear();
    events.close(reason, false);
  });
  const remote = `${socket.remoteAddress}:${socket.remotePort}`;
  return {
    get remote() {
      return socket.remoteAddress === undefined ? remote : `${socket.remoteAddress}:${socket.remotePort}`;
    },
    secure: false,
    peerFingerprint: null,
    write(buffers, written) {
      if (socket.destroyed || buffers.length === 0) return written?.(); // nothing took them
      if (staged) return staged.write(buffers, written);
      // Write callbacks come in order: the last one's means the stream is done with them all
      // (sent, or failed: either way libuv reads them no more).
      let last: (() => void) | undefined;
      if (written !== undefined) {
        unwritten.add(written);
        last = () => {
          if (unwritten.delete(written)) written();
        };
      }
      socket.cork();
      for (let i = 0; i < buffers.length; i++)
        socket.write(buffers[i], i === buffers.length - 1 ? last : undefined);
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
    receiveIntoSlabs() {
      if (slabs === undefined) {
        slabs = new ReceiveSlabs();
        slabs.negotiated(); // no negotiation here: reads go to slabs from the start
      }
      return slabs;
    },
    get readsIntoSlabs() {
      return slabReads;
    },
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
