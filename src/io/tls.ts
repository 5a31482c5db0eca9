/**
 * The replication link over TLS 1.3, mutually authenticated: the dialer (primary) and the
 * listener (secondary) each present the node's certificate and check the other's against the
 * trust they were given (pinned fingerprints or a CA) once the handshake is done — before a
 * single replication byte reaches the session. A refusal is reported once, with the reason and
 * the fingerprint seen, to the owner (who logs it and counts it).
 *
 * The listener also bounds what unauthenticated peers can hold: a handshake that does not
 * finish within the timeout is dropped (slow-loris), and connections beyond a number still in
 * their handshake are refused at once. The same listener serves `--insecure-plaintext` (no TLS;
 * the deadline then holds until the first byte, the session's hello timeout after it). A peer on
 * the other transport (TLS against plaintext, either way) is told so with a refusal it reads as
 * one, so that it redials slowly.
 */
import net from 'node:net';
import tls from 'node:tls';
import type { Identity } from '../security/identity.js';
import { type PeerTrust, verifyPeer } from '../security/trust.js';
import { socketConnection } from './net.js';
import { TlsAcceptor } from './tls-acceptor.js';
import type { Connection, ConnectionEvents, Dialer } from './transport.js';

/** A handshake (TCP accept to an authenticated peer) that takes longer is dropped. */
export const HANDSHAKE_TIMEOUT_MS = 10_000;
/** Connections still in their handshake at once; more are refused. */
export const UNAUTHENTICATED_CONNECTIONS_MAX = 16;

const BOTH_SIDES = 'both sides need TLS, or both --insecure-plaintext on loopback';
const NOT_TLS = `not TLS (a plaintext peer? ${BOTH_SIDES})`;
const TLS_PEER_ON_PLAINTEXT = `a TLS peer, and this side listens in plaintext (--insecure-plaintext): ${BOTH_SIDES}`;
/** Told to the peer: a plaintext primary logs it; a TLS one fails its handshake on the bytes. */
const PLAINTEXT_REFUSAL = `the secondary listens in plaintext (--insecure-plaintext): ${BOTH_SIDES}`;
const TLS_ONLY_REFUSAL = `the secondary speaks TLS only: ${BOTH_SIDES}`;

export interface LinkSecurity {
  identity: Identity;
  trust: PeerTrust;
}

/** A peer refused (or a TLS handshake that failed): for one log line and a metric. */
export interface AuthFailure {
  remote: string;
  reason: string;
  /** The SHA-256 fingerprint of the certificate the peer presented, if it presented one. */
  fingerprint: string | null;
}

function secureContextOptions(security: LinkSecurity): tls.SecureContextOptions {
  return {
    key: security.identity.key,
    cert: security.identity.cert,
    ca: security.trust.ca,
    minVersion: 'TLSv1.3',
    maxVersion: 'TLSv1.3',
  };
}

/** Why a TLS handshake failed, for a person (OpenSSL's reason, not its source paths). */
function describeTlsError(err: Error & { code?: string; reason?: string }): string {
  if (err.code === 'ERR_SSL_WRONG_VERSION_NUMBER' || err.code === 'ERR_SSL_HTTP_REQUEST') {
    return NOT_TLS;
  }
  if (
    err.code === 'ERR_SSL_NO_PROTOCOLS_AVAILABLE' ||
    err.code === 'ERR_SSL_UNSUPPORTED_PROTOCOL' ||
    err.code === 'ERR_SSL_TLSV1_ALERT_PROTOCOL_VERSION'
  ) {
    return `TLS version not supported (volrep speaks TLS 1.3 only): ${err.reason ?? err.message.trim()}`;
  }
  return `TLS handshake failed: ${err.reason ?? err.message.trim()}`;
}

/**
 * Connects to the secondary over TLS; `open` fires only once its certificate is accepted.
 * `onRefused`: an authentication failure (counted, logged). `onLost`: a connection that closed
 * mid-handshake without an error of TLS's own (a secondary restarting, a proxy with nothing
 * behind it): no authentication failure, only a line for debugging.
 */
export function tlsDialer(
  host: string,
  port: number,
  security: LinkSecurity,
  onRefused: (f: AuthFailure) => void,
  onLost: (f: AuthFailure) => void = () => {},
): Dialer {
  const peer = net.isIP(host) === 6 ? `[${host}]:${port}` : `${host}:${port}`;
  return {
    peer,
    dial(events: ConnectionEvents): Connection {
      const socket = tls.connect({
        ...secureContextOptions(security),
        host,
        port,
        // Identity is the pinned fingerprint or the CA, not a host name.
        rejectUnauthorized: false,
        checkServerIdentity: () => undefined,
        servername: net.isIP(host) === 0 ? host : undefined,
      });
      socket.setNoDelay(true);
      let verified = false;
      let handshaking = true;
      let heard = false;
      /** Either side refused the other's certificate: the primary then redials slowly. */
      let authFailed = false;
      let closedHere = false;
      const refused = (f: AuthFailure): void => {
        authFailed = true;
        onRefused(f);
      };
      const connection = socketConnection(socket, {
        open: () => {},
        data: (chunk) => {
          heard = true;
          if (verified) events.data(chunk);
        },
        close: (reason) => {
          // TLS 1.3 lets the client finish first: a secondary that refuses our certificate just
          // closes, before its first byte. Say what that most likely means (unless this side
          // closed it: no welcome in time, say).
          if (verified && !heard && !closedHere) {
            refused({
              remote: peer,
              reason: `the secondary closed the connection before its welcome: most likely it refused this primary's certificate (${security.identity.fingerprint}); check that the secondary's --allow-peer has it (or its --tls-ca signed it) and that it is valid`,
              fingerprint: connection.peerFingerprint,
            });
          }
          events.close(reason, authFailed);
        },
      });
      const { close, end } = connection;
      connection.close = (why) => {
        closedHere = true;
        close(why);
      };
      connection.end = (why) => {
        closedHere = true;
        end(why);
      };
      socket.on('error', (err: Error & { code?: string; library?: unknown }) => {
        if (
          !handshaking ||
          err.code === 'ECONNREFUSED' ||
          err.code === 'EHOSTUNREACH' ||
          err.code === 'ETIMEDOUT'
        )
          return;
        handshaking = false;
        const failure = { remote: peer, reason: describeTlsError(err), fingerprint: null };
        // An OpenSSL error (an alert from the secondary, say) is a refusal; a connection that
        // closes mid-handshake (a secondary restarting, a proxy with nothing behind it) is not.
        if (typeof err.library === 'string') refused(failure);
        else onLost(failure);
      });
      socket.once('secureConnect', () => {
        handshaking = false;
        const verdict = verifyPeer(socket, security.trust);
        if (!verdict.ok) {
          refused({
            remote: peer,
            reason: `refused the secondary: ${verdict.reason}`,
            fingerprint: verdict.fingerprint,
          });
          connection.close(`refused the secondary's certificate: ${verdict.reason}`);
          return;
        }
        verified = true;
        Object.assign(connection, { secure: true, peerFingerprint: verdict.fingerprint });
        events.open();
      });
      return connection;
    },
  };
}

export interface ReplicationListenerOptions {
  /** TLS with these; undefined: plaintext (--insecure-plaintext). */
  security: LinkSecurity | undefined;
  onRefused: (f: AuthFailure) => void;
  /** An authenticated (or, in plaintext, any) connection: returns the events its owner wants. */
  onConnection: (connection: Connection) => ConnectionEvents;
  /**
   * The bytes of a refusal a primary reads as one (a refuse frame): the last word to a peer on the
   * wrong transport, so that it redials slowly instead of 20 times a second.
   */
  refusal: (reason: string) => Buffer[];
  handshakeTimeoutMs?: number;
  unauthenticatedMax?: number;
}

/** A TLS connection's first byte: the record type of its ClientHello. */
const TLS_HANDSHAKE_RECORD = 0x16;

/**
 * The secondary's listener: the first bytes say whether the peer speaks this listener's
 * transport; then the TLS handshake and peer check (or, in plaintext, nothing), all bounded in
 * time and number; then the connection to its owner.
 */
export function replicationListener(opts: ReplicationListenerOptions): net.Server {
  const security = opts.security;
  const timeoutMs = opts.handshakeTimeoutMs ?? HANDSHAKE_TIMEOUT_MS;
  const pendingMax = opts.unauthenticatedMax ?? UNAUTHENTICATED_CONNECTIONS_MAX;
  const acceptor = security && new TlsAcceptor({ ...secureContextOptions(security), requestCert: true });
  let pending = 0;
  /** Connections not yet handed on: nobody else closes them when the listener closes. */
  const unsettled = new Set<net.Socket>();
  const server = net.createServer({ noDelay: true }, (raw) => {
    const remote = `${raw.remoteAddress}:${raw.remotePort}`;
    raw.on('error', () => {});
    if (pending >= pendingMax) {
      opts.onRefused({
        remote,
        reason: `too many connections still in their handshake (${pendingMax})`,
        fingerprint: null,
      });
      raw.destroy();
      return;
    }
    // Admission and the deadline are the raw socket's: slow-loris gets no more than timeoutMs.
    pending += 1;
    unsettled.add(raw);
    let settled = false;
    const settle = () => {
      if (settled) return false;
      settled = true;
      pending -= 1;
      unsettled.delete(raw);
      clearTimeout(timer);
      return true;
    };
    const timer = setTimeout(() => {
      if (!settle()) return;
      const what = security ? 'TLS handshake' : 'byte';
      opts.onRefused({ remote, reason: `no ${what} within ${timeoutMs} ms`, fingerprint: null });
      raw.destroy();
    }, timeoutMs);
    timer.unref();
    raw.once('close', () => settle());
    raw.once('data', (first: Buffer) => {
      // Put the bytes back for whoever reads next (node's TLS socket takes a paused socket's
      // buffered bytes first).
      raw.pause();
      raw.unshift(first);
      const tlsPeer = first[0] === TLS_HANDSHAKE_RECORD;
      if (security === undefined) {
        if (tlsPeer) return refuseTransport(raw, remote, TLS_PEER_ON_PLAINTEXT, PLAINTEXT_REFUSAL);
        if (!settle()) return;
        hand(raw, false, null, true);
        return;
      }
      if (!tlsPeer) return refuseTransport(raw, remote, NOT_TLS, TLS_ONLY_REFUSAL);
      acceptor!.accept(raw, {
        secure: (socket) => {
          if (!settle()) return socket.destroy();
          const verdict = verifyPeer(socket, security.trust);
          if (!verdict.ok) {
            opts.onRefused({
              remote,
              reason: `refused a primary: ${verdict.reason}`,
              fingerprint: verdict.fingerprint,
            });
            socket.destroy();
            return;
          }
          hand(socket, true, verdict.fingerprint);
        },
        failed: (err) => {
          if (settle()) opts.onRefused({ remote, reason: describeTlsError(err), fingerprint: null });
        },
      });
    });

    /**
     * A peer on the wrong transport gets a refusal frame as its last word: a plaintext primary
     * reads it as a refusal, a TLS one fails its handshake on it; either then redials slowly.
     * The connection counts as unauthenticated until it is gone (at most a second more): a flood
     * of them is held to the same bound as any other.
     */
    function refuseTransport(socket: net.Socket, from: string, logged: string, told: string): void {
      if (settled) return;
      clearTimeout(timer);
      opts.onRefused({ remote: from, reason: logged, fingerprint: null });
      socket.end(Buffer.concat(opts.refusal(told)));
      setTimeout(() => socket.destroy(), 1000).unref();
    }
  });
  // A stopping daemon waits for its listener to close, which waits for every connection: one
  // still silent would hold the stop until its deadline.
  const close = server.close.bind(server);
  server.close = (callback?: (err?: Error) => void) => {
    close(callback);
    for (const raw of unsettled) raw.destroy();
    return server;
  };
  return server;

  /** `resume`: the socket was paused to look at its first bytes (flowing again once the owner has it). */
  function hand(socket: net.Socket, secure: boolean, fingerprint: string | null, resume = false): void {
    let events: ConnectionEvents | undefined;
    const connection = socketConnection(socket, {
      open: () => {},
      data: (chunk) => events?.data(chunk),
      close: (reason, refused) => events?.close(reason, refused),
    });
    Object.assign(connection, { secure, peerFingerprint: fingerprint });
    // Before the owner sees it: an owner that pauses the connection at once stays paused.
    if (resume) socket.resume();
    events = opts.onConnection(connection);
  }
}
