/**
 * A replication connection says when it reads a write's buffers no more (`written`), so that the
 * primary can hand an NBD client's receive memory back for reuse: over real sockets on loopback,
 * plaintext and TLS, memory written over as soon as `written` says so never changes what
 * arrives, every write hears once, and a connection closed with bytes still queued tells the
 * rest (they will never be sent: their memory is free) instead of leaving them waiting.
 */
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import net, { type AddressInfo } from 'node:net';
import { after, before, describe, it } from 'node:test';
import tls from 'node:tls';
import { socketConnection } from '../../src/io/net.js';
import { STAGE_BYTES } from '../../src/io/staged-writes.js';
import type { Connection } from '../../src/io/transport.js';
import { generateIdentityPem } from '../../src/security/identity.js';

let pem: { key: string; cert: string };
before(async () => {
  pem = await generateIdentityPem('written-test');
});

type Transport = 'plaintext' | 'TLS';

interface Pair {
  connection: Connection;
  /** What the other side received, once the connection closed. */
  received: Promise<Buffer>;
  /** The other side starts (or stops) reading. */
  peer: Promise<net.Socket>;
  closed: Promise<void>;
  server: net.Server;
}

async function open(transport: Transport): Promise<Pair> {
  let handPeer!: (s: net.Socket) => void;
  const peer = new Promise<net.Socket>((resolve) => {
    handPeer = resolve;
  });
  let resolveReceived!: (b: Buffer) => void;
  const received = new Promise<Buffer>((resolve) => {
    resolveReceived = resolve;
  });
  const onPeer = (s: net.Socket) => {
    const chunks: Buffer[] = [];
    s.on('data', (c: Buffer) => chunks.push(c));
    s.on('error', () => {});
    s.on('close', () => resolveReceived(Buffer.concat(chunks)));
    handPeer(s);
  };
  const server =
    transport === 'TLS'
      ? tls.createServer({ key: pem.key, cert: pem.cert, minVersion: 'TLSv1.3' }, onPeer)
      : net.createServer(onPeer);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  const socket =
    transport === 'TLS'
      ? tls.connect({ host: '127.0.0.1', port, rejectUnauthorized: false })
      : net.connect({ host: '127.0.0.1', port });
  await new Promise<void>((resolve, reject) => {
    socket.once(transport === 'TLS' ? 'secureConnect' : 'connect', () => resolve());
    socket.once('error', reject);
  });
  let closedResolve!: () => void;
  const closed = new Promise<void>((resolve) => {
    closedResolve = resolve;
  });
  const connection = socketConnection(socket, {
    open: () => {},
    data: () => {},
    close: () => closedResolve(),
  });
  return { connection, received, peer, closed, server };
}

const digest = (b: Buffer) => createHash('sha256').update(b).digest('hex');
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

for (const transport of ['plaintext', 'TLS'] as const) {
  describe(`a ${transport} connection lets go of written buffers`, () => {
    let pair: Pair;
    after(() => pair?.server.close());

    it('only once it reads them no more: memory written over at that moment changes nothing sent', async () => {
      pair = await open(transport);
      const peer = await pair.peer;
      peer.pause(); // the reader lags: writes queue up behind it
      const original: Buffer[] = [];
      const heard: boolean[] = [];
      for (let turn = 0; turn < 40; turn++) {
        const batch: Buffer[] = [];
        for (let i = 0; i < 6; i++) {
          const size = [24, 0, 4096, 65536, STAGE_BYTES + 7, 3 * STAGE_BYTES][(turn + i) % 6];
          batch.push(randomBytes(size));
        }
        original.push(Buffer.concat(batch));
        const index = heard.length;
        heard.push(false);
        pair.connection.write(batch, () => {
          assert.equal(heard[index], false, `write ${index} heard twice`);
          heard[index] = true;
          for (const b of batch) b.fill(0xee); // as a reused receive buffer would be
        });
      }
      await sleep(100);
      assert.ok(heard.includes(false), 'some writes wait while the reader lags');
      peer.resume();
      for (let i = 0; i < 100 && heard.includes(false); i++) await sleep(20);
      assert.ok(!heard.includes(false), 'every write heard once the reader caught up');
      pair.connection.end('done');
      const got = await pair.received;
      assert.equal(digest(got), digest(Buffer.concat(original)));
    });

    it('a close with bytes still queued tells every waiting write, and never twice', async () => {
      pair?.server.close();
      pair = await open(transport);
      (await pair.peer).pause(); // never reads: 32 MiB cannot all leave
      const heard = new Set<number>();
      for (let i = 0; i < 32; i++) {
        pair.connection.write([randomBytes(1024 * 1024)], () => {
          assert.ok(!heard.has(i), `write ${i} heard twice`);
          heard.add(i);
        });
      }
      await sleep(100);
      const before = heard.size;
      assert.ok(before < 32, `${before} of 32 writes let go while the reader reads nothing`);
      pair.connection.close('test');
      await pair.closed;
      await sleep(50);
      assert.equal(heard.size, 32, 'every write heard after the close');
      // A write after the close is let go of at once (nothing took it).
      let late = false;
      pair.connection.write([Buffer.alloc(10)], () => {
        late = true;
      });
      assert.equal(late, true);
    });
  });
}
