/**
 * Writes over TLS go through two reused staging buffers (src/io/staged-writes.ts): over a real
 * TLS connection on loopback, every byte arrives in order, `end` sends what is still queued
 * first, and the TLS stream is never handed several buffers at once (which would make node copy
 * them all into one new allocation).
 */
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import type { AddressInfo } from 'node:net';
import { after, before, describe, it } from 'node:test';
import tls from 'node:tls';
import { STAGE_BYTES, StagedWriter } from '../../src/io/staged-writes.js';
import { generateIdentityPem } from '../../src/security/identity.js';

let pem: { key: string; cert: string };
let server: tls.Server;

before(async () => {
  pem = await generateIdentityPem('staged-writes-test');
  server = tls.createServer({ key: pem.key, cert: pem.cert, minVersion: 'TLSv1.3' });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
});

after(() => server.close());

/** A client socket, and what the server receives on it (resolved when it ends). */
async function connect(): Promise<{ socket: tls.TLSSocket; received: Promise<Buffer> }> {
  const received = new Promise<Buffer>((resolve) =>
    server.once('secureConnection', (peer: tls.TLSSocket) => {
      const chunks: Buffer[] = [];
      peer.on('data', (c: Buffer) => chunks.push(c));
      peer.on('end', () => resolve(Buffer.concat(chunks)));
    }),
  );
  const { port } = server.address() as AddressInfo;
  const socket = tls.connect({ host: '127.0.0.1', port, rejectUnauthorized: false });
  await new Promise<void>((resolve, reject) => {
    socket.once('secureConnect', resolve);
    socket.once('error', reject);
  });
  return { socket, received };
}

const digest = (b: Buffer) => createHash('sha256').update(b).digest('hex');

describe('staged writes over TLS', () => {
  it('deliver every byte in order, small and large buffers mixed, and end after the last', async () => {
    const { socket, received } = await connect();
    let writevs = 0;
    const writev = socket._writev?.bind(socket);
    socket._writev = (chunks, cb) => {
      writevs += 1;
      writev?.(chunks, cb);
    };
    const writer = new StagedWriter(socket);
    const sent: Buffer[] = [];
    // Frame-like traffic: small headers and payloads from 0 bytes to several stages.
    for (let turn = 0; turn < 40; turn++) {
      const batch: Buffer[] = [];
      for (let i = 0; i < 30; i++) {
        batch.push(randomBytes(24));
        const size = [0, 512, 4096, 65536, STAGE_BYTES + 7, 3 * STAGE_BYTES][(turn + i) % 6];
        batch.push(randomBytes(size));
      }
      sent.push(...batch);
      writer.write(batch);
      assert.ok(socket.writableLength <= 2 * STAGE_BYTES, 'at most two stages handed to the socket');
    }
    writer.end();
    const got = await received;
    const all = Buffer.concat(sent);
    assert.equal(got.length, all.length);
    assert.equal(digest(got), digest(all));
    assert.equal(writevs, 0, 'the TLS stream was never handed several buffers at once');
  });

  it('end with nothing queued ends at once', async () => {
    const { socket, received } = await connect();
    const writer = new StagedWriter(socket);
    writer.end();
    assert.equal((await received).length, 0);
  });
});
