/**
 * A closed connection says whether the peer had taken it (real sockets on loopback): the primary
 * redials fast while nothing answers, and backs off when the secondary answers and the link still
 * does not come up (a TLS certificate refused either way).
 */
import assert from 'node:assert/strict';
import net, { type AddressInfo } from 'node:net';
import { after, before, describe, it } from 'node:test';
import tls from 'node:tls';
import { tcpDialer } from '../../src/io/net.js';
import { tlsDialer } from '../../src/io/tls.js';
import type { Dialer } from '../../src/io/transport.js';
import { fingerprintOf } from '../../src/security/fingerprint.js';
import { generateIdentityPem, type Identity } from '../../src/security/identity.js';

function identity(pem: { key: string; cert: string }): Identity {
  return { ...pem, fingerprint: fingerprintOf(pem.cert), certFile: 'test', keyFile: 'test' };
}

/** Dials once: whether `open` fired, and how the connection closed. */
function dialOnce(dialer: Dialer): Promise<{ opened: boolean; reason: string; answered: boolean }> {
  return new Promise((resolve) => {
    let opened = false;
    const connection = dialer.dial({
      open: () => {
        opened = true;
        connection.close('test done');
      },
      data: () => {},
      close: (reason, answered) => resolve({ opened, reason, answered }),
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

let pem: { key: string; cert: string };
let other: { key: string; cert: string };
const servers: net.Server[] = [];

before(async () => {
  pem = await generateIdentityPem('net-test-server');
  other = await generateIdentityPem('net-test-client');
});

after(() => {
  for (const s of servers) s.close();
});

async function listen(server: net.Server): Promise<number> {
  servers.push(server);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return (server.address() as AddressInfo).port;
}

describe('a closed connection says whether the peer took it', () => {
  it('nobody listening: not answered', async () => {
    const r = await dialOnce(tcpDialer('127.0.0.1', await freePort()));
    assert.equal(r.opened, false);
    assert.equal(r.answered, false);
    assert.match(r.reason, /ECONNREFUSED/);
  });

  it('a listener that takes the connection and drops it: answered', async () => {
    const port = await listen(net.createServer((socket) => socket.destroy()));
    const r = await dialOnce(tcpDialer('127.0.0.1', port));
    assert.equal(r.answered, true);
  });

  it('TLS: nobody listening is not answered; a certificate that is not pinned is', async () => {
    const security = { identity: identity(other), trust: { fingerprints: ['00'.repeat(32)] } };
    const refusals: string[] = [];
    const none = await dialOnce(
      tlsDialer('127.0.0.1', await freePort(), security, (f) => refusals.push(f.reason)),
    );
    assert.deepEqual([none.opened, none.answered], [false, false]);
    assert.equal(refusals.length, 0, 'a secondary that is not there is no authentication failure');

    const port = await listen(tls.createServer({ key: pem.key, cert: pem.cert, minVersion: 'TLSv1.3' }));
    const refused = await dialOnce(tlsDialer('127.0.0.1', port, security, (f) => refusals.push(f.reason)));
    assert.deepEqual([refused.opened, refused.answered], [false, true]);
    assert.equal(refusals.length, 1, `refused once: ${refusals.join('; ')}`);
  });

  it('TLS: a pinned certificate opens, and a close after that is answered', async () => {
    const security = { identity: identity(other), trust: { fingerprints: [fingerprintOf(pem.cert)] } };
    const port = await listen(tls.createServer({ key: pem.key, cert: pem.cert, minVersion: 'TLSv1.3' }));
    // (Closed by this side before a byte came back, it reads as a likely refusal: not the point here.)
    const r = await dialOnce(tlsDialer('127.0.0.1', port, security, () => {}));
    assert.deepEqual([r.opened, r.answered], [true, true]);
  });
});
