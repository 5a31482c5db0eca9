/**
 * A closed connection says whether it failed authentication (real sockets on loopback): the
 * primary redials fast while the secondary is not there (nobody listening, or a proxy with
 * nothing behind it that takes the connection and drops it), and slowly once a certificate was
 * refused either way (that needs an operator, and each handshake costs both sides).
 */
import assert from 'node:assert/strict';
import net, { type AddressInfo } from 'node:net';
import { after, before, describe, it } from 'node:test';
import tls from 'node:tls';
import { ChunkQueue } from '../../src/io/chunk-queue.js';
import { tcpDialer } from '../../src/io/net.js';
import { type AuthFailure, type LinkSecurity, replicationListener, tlsDialer } from '../../src/io/tls.js';
import type { Connection, Dialer } from '../../src/io/transport.js';
import { FrameDecoder } from '../../src/replication/frames.js';
import { decodeMessage, encodeRefusalFrame } from '../../src/replication/messages.js';
import { fingerprintOf } from '../../src/security/fingerprint.js';
import { generateIdentityPem, type Identity } from '../../src/security/identity.js';

function identity(pem: { key: string; cert: string }): Identity {
  return { ...pem, fingerprint: fingerprintOf(pem.cert), certFile: 'test', keyFile: 'test' };
}

/** Dials once: whether `open` fired, and how the connection closed. */
function dialOnce(dialer: Dialer): Promise<{ opened: boolean; reason: string; refused: boolean }> {
  return new Promise((resolve) => {
    let opened = false;
    dialer.dial({
      open: () => {
        opened = true;
      },
      data: () => {},
      close: (reason, refused) => resolve({ opened, reason, refused }),
    });
  });
}

/** A port nobody listens on (bound, then released). */
async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((resolve) => s.listen(0, '127.0.0.1', resolve));
  const { port } = s.address() as AddressInfo;
  await new Promise<void>((resolve) => s.close(() => resolve()));
  return port;
}

let server: { key: string; cert: string };
let client: { key: string; cert: string };
const servers: net.Server[] = [];

before(async () => {
  server = await generateIdentityPem('net-test-server');
  client = await generateIdentityPem('net-test-client');
});

after(() => {
  for (const s of servers) s.close();
});

async function listen(s: net.Server): Promise<number> {
  servers.push(s);
  await new Promise<void>((resolve) => s.listen(0, '127.0.0.1', resolve));
  return (s.address() as AddressInfo).port;
}

/** A TLS 1.3 server with `server`'s certificate that says one byte, then ends each connection. */
function tlsServer(): tls.Server {
  return tls.createServer({ key: server.key, cert: server.cert, minVersion: 'TLSv1.3' }, (socket) =>
    socket.end(Buffer.from([1])),
  );
}

function pinning(fingerprint: string): LinkSecurity {
  return { identity: identity(client), trust: { fingerprints: [fingerprint] } };
}

describe('a closed connection says whether it failed authentication', () => {
  it('plaintext: nobody listening, or a listener that drops the connection: not refused', async () => {
    const none = await dialOnce(tcpDialer('127.0.0.1', await freePort()));
    assert.deepEqual([none.opened, none.refused], [false, false]);
    assert.match(none.reason, /ECONNREFUSED/);
    const port = await listen(net.createServer((socket) => socket.destroy()));
    const dropped = await dialOnce(tcpDialer('127.0.0.1', port));
    assert.equal(dropped.refused, false);
  });

  it('TLS: nobody listening, or a proxy with nothing behind it: not refused', async () => {
    const failures: string[] = [];
    const security = pinning(fingerprintOf(server.cert));
    const none = await dialOnce(
      tlsDialer('127.0.0.1', await freePort(), security, (f) => failures.push(f.reason)),
    );
    assert.deepEqual([none.opened, none.refused], [false, false]);
    assert.equal(failures.length, 0, 'a secondary that is not there is no authentication failure');
    const port = await listen(net.createServer((socket) => socket.destroy()));
    const lost: string[] = [];
    const dropped = await dialOnce(
      tlsDialer(
        '127.0.0.1',
        port,
        security,
        (f) => failures.push(f.reason),
        (f) => lost.push(f.reason),
      ),
    );
    assert.deepEqual([dropped.opened, dropped.refused], [false, false]);
    assert.equal(
      failures.length,
      0,
      `a handshake cut off is no authentication failure: ${failures.join('; ')}`,
    );
    assert.equal(lost.length, 1, 'reported as a handshake cut off');
  });

  it("TLS: the secondary's certificate is not the pinned one: refused", async () => {
    const failures: string[] = [];
    const port = await listen(tlsServer());
    const r = await dialOnce(
      tlsDialer('127.0.0.1', port, pinning('00'.repeat(32)), (f) => failures.push(f.reason)),
    );
    assert.deepEqual([r.opened, r.refused], [false, true]);
    assert.equal(failures.length, 1, `one authentication failure: ${failures.join('; ')}`);
  });

  it('TLS: a secondary that asks for a client certificate this primary cannot give: refused', async () => {
    const failures: string[] = [];
    const strict = tls.createServer({
      key: server.key,
      cert: server.cert,
      minVersion: 'TLSv1.3',
      requestCert: true,
      rejectUnauthorized: true,
      ca: server.cert, // trusts only itself: the primary's certificate is refused with an alert
    });
    const port = await listen(strict);
    const r = await dialOnce(
      tlsDialer('127.0.0.1', port, pinning(fingerprintOf(server.cert)), (f) => failures.push(f.reason)),
    );
    assert.equal(r.refused, true, `closed: ${r.reason}`);
    assert.ok(failures.length >= 1);
  });

  it('TLS: a handshake the secondary ends with an alert (TLS 1.2 only): refused', async () => {
    const failures: string[] = [];
    const old = tls.createServer({ key: server.key, cert: server.cert, maxVersion: 'TLSv1.2' });
    const port = await listen(old);
    const r = await dialOnce(
      tlsDialer('127.0.0.1', port, pinning(fingerprintOf(server.cert)), (f) => failures.push(f.reason)),
    );
    assert.deepEqual([r.opened, r.refused], [false, true]);
    assert.match(failures.join('; '), /TLS version not supported/);
  });

  it('TLS: the pinned certificate opens; this side closing before a byte came back is no refusal', async () => {
    const failures: string[] = [];
    const silent = tls.createServer({ key: server.key, cert: server.cert, minVersion: 'TLSv1.3' }, () => {});
    const port = await listen(silent);
    const r = await new Promise<{ opened: boolean; refused: boolean }>((resolve) => {
      let opened = false;
      const connection = tlsDialer('127.0.0.1', port, pinning(fingerprintOf(server.cert)), (f) =>
        failures.push(f.reason),
      ).dial({
        open: () => {
          opened = true;
          connection.close('no welcome from the secondary in time');
        },
        data: () => {},
        close: (_reason, refused) => resolve({ opened, refused }),
      });
    });
    assert.deepEqual([r.opened, r.refused], [true, false]);
    assert.equal(failures.length, 0, `no authentication failure: ${failures.join('; ')}`);
  });

  it('TLS: the pinned certificate opens; a close after the secondary spoke is no refusal', async () => {
    const port = await listen(tlsServer());
    const r = await dialOnce(
      tlsDialer('127.0.0.1', port, pinning(fingerprintOf(server.cert)), (f) => assert.fail(f.reason)),
    );
    assert.deepEqual([r.opened, r.refused], [true, false]);
  });
});

/** A secondary's listener on loopback: its refusals, and the connections it handed on (echoed back). */
async function secondaryListener(security: LinkSecurity | undefined) {
  const refusals: AuthFailure[] = [];
  const handed: Connection[] = [];
  const port = await listen(
    replicationListener({
      security,
      onRefused: (f) => refusals.push(f),
      onConnection: (connection) => {
        handed.push(connection);
        return { open: () => {}, data: (chunk) => connection.write([chunk]), close: () => {} };
      },
      refusal: encodeRefusalFrame,
    }),
  );
  return { port, refusals, handed };
}

/** The secondary's side of the link: its certificate, and the client's pinned. */
function secondarySecurity(): LinkSecurity {
  return { identity: identity(server), trust: { fingerprints: [fingerprintOf(client.cert)] } };
}

/** A plaintext connection that sends `bytes`: everything it got back, once closed. */
function plaintextExchange(port: number, bytes: Buffer): Promise<Buffer> {
  return new Promise((resolve) => {
    const got: Buffer[] = [];
    const socket = net.connect({ host: '127.0.0.1', port }, () => socket.write(bytes));
    socket.on('error', () => {});
    socket.on('data', (chunk: Buffer) => {
      got.push(chunk);
      if (Buffer.concat(got).length >= bytes.length) socket.end();
    });
    socket.on('close', () => resolve(Buffer.concat(got)));
  });
}

describe('a peer on the other transport is told so, in words it reads as a refusal', () => {
  it('a TLS primary against a plaintext listener: refused on both sides, no connection handed on', async () => {
    const listener = await secondaryListener(undefined);
    const failures: string[] = [];
    const r = await dialOnce(
      tlsDialer('127.0.0.1', listener.port, pinning(fingerprintOf(server.cert)), (f) =>
        failures.push(f.reason),
      ),
    );
    assert.deepEqual([r.opened, r.refused], [false, true], `closed: ${r.reason}`);
    assert.match(failures.join('; '), /^not TLS \(a plaintext peer\?/);
    assert.deepEqual(
      listener.refusals.map((f) => f.reason),
      [
        'a TLS peer, and this side listens in plaintext (--insecure-plaintext): both sides need TLS, or both --insecure-plaintext on loopback',
      ],
    );
    assert.equal(listener.handed.length, 0);
  });

  it('a plaintext primary against a TLS listener: a refuse frame back, "not TLS" logged', async () => {
    const listener = await secondaryListener(secondarySecurity());
    const hello = Buffer.concat(encodeRefusalFrame('any frame will do'));
    const reply = await plaintextExchange(listener.port, hello);
    const queue = new ChunkQueue();
    queue.push(reply);
    const decoded = new FrameDecoder().next(queue);
    assert.equal(decoded?.kind, 'frame', `a frame back: ${reply.toString('hex').slice(0, 80)}`);
    const message = decodeMessage(decoded.frame);
    assert.equal(message.type, 'refuse');
    assert.match(message.refusal.reason, /^the secondary speaks TLS only/);
    assert.match(listener.refusals.map((f) => f.reason).join('; '), /^not TLS \(a plaintext peer\?/);
    assert.equal(listener.handed.length, 0);
  });

  it('the right transport: the first bytes reach the connection handed on, plaintext and TLS', async () => {
    const plain = await secondaryListener(undefined);
    const bytes = Buffer.concat(encodeRefusalFrame('echo me'));
    assert.deepEqual(await plaintextExchange(plain.port, bytes), bytes);
    assert.equal(plain.handed.length, 1);
    const secure = await secondaryListener(secondarySecurity());
    const echoed = await new Promise<Buffer>((resolve) => {
      const connection = tlsDialer('127.0.0.1', secure.port, pinning(fingerprintOf(server.cert)), (f) =>
        assert.fail(f.reason),
      ).dial({
        open: () => connection.write([bytes]),
        data: (chunk) => {
          connection.close('done');
          resolve(chunk);
        },
        close: () => {},
      });
    });
    assert.deepEqual(echoed, bytes);
    assert.deepEqual(secure.refusals, []);
    assert.equal(secure.handed.length, 1);
    assert.equal(secure.handed[0]!.secure, true);
  });

  it('closing the listener closes the connections not handed on yet (a stop is not held by a silent peer)', async () => {
    for (const security of [undefined, secondarySecurity()]) {
      const refusals: AuthFailure[] = [];
      const server = replicationListener({
        security,
        onRefused: (f) => refusals.push(f),
        onConnection: () => assert.fail('nothing to hand on'),
        refusal: encodeRefusalFrame,
      });
      await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
      const { port } = server.address() as AddressInfo;
      const silent = net.connect({ host: '127.0.0.1', port });
      silent.on('error', () => {});
      const peerClosed = new Promise<void>((resolve) => silent.once('close', () => resolve()));
      await new Promise<void>((resolve) => silent.once('connect', () => resolve()));
      // TLS: one byte of a ClientHello, so that the handshake has begun.
      if (security) silent.write(Buffer.from([0x16, 0x03]));
      // The listener has taken it (its deadline is 10 s): now stop.
      await new Promise((resolve) => setTimeout(resolve, 50));
      const t0 = performance.now();
      await new Promise<void>((resolve) => server.close(() => resolve()));
      const ms = performance.now() - t0;
      assert.ok(ms < 2000, `closed in ${ms.toFixed(0)} ms (${security ? 'TLS' : 'plaintext'})`);
      await peerClosed;
      assert.deepEqual(refusals, [], 'a stop is no refusal');
    }
  });

  it('a peer refused for its transport counts against the bound on unauthenticated connections until it is gone', async () => {
    const refusals: AuthFailure[] = [];
    const server = replicationListener({
      security: secondarySecurity(),
      onRefused: (f) => refusals.push(f),
      onConnection: () => assert.fail('nothing to hand on'),
      refusal: encodeRefusalFrame,
      unauthenticatedMax: 1,
    });
    const port = await listen(server);
    const connect = async (opts: { allowHalfOpen?: boolean } = {}) => {
      const socket = net.connect({ host: '127.0.0.1', port, ...opts });
      socket.on('error', () => {});
      const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
      await new Promise<void>((resolve) => socket.once('connect', () => resolve()));
      return { socket, closed };
    };
    // A peer that takes the refusal and keeps its side open (as a flood would).
    const stubborn = await connect({ allowHalfOpen: true });
    const refused = new Promise<void>((resolve) => stubborn.socket.once('end', () => resolve()));
    stubborn.socket.resume();
    stubborn.socket.write(Buffer.concat(encodeRefusalFrame('plaintext hello')));
    await refused;
    assert.match(refusals[0]?.reason ?? '', /^not TLS/);
    const next = await connect();
    await next.closed;
    assert.match(refusals[1]?.reason ?? '', /too many connections still in their handshake \(1\)/);
    // The listener drops the refused peer within a second (which a half-open peer does not
    // notice); then there is room again.
    await new Promise((resolve) => setTimeout(resolve, 1300));
    const later = await connect();
    await new Promise((resolve) => setTimeout(resolve, 100));
    assert.equal(later.socket.destroyed, false, 'admitted once the refused peer is gone');
    assert.equal(refusals.length, 2);
    later.socket.destroy();
    stubborn.socket.destroy();
  });
});
