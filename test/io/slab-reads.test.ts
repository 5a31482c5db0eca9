/**
 * A secondary's replication connection reads into reused memory once its owner asks
 * (`receiveIntoSlabs`): over real sockets on loopback, an accepted plaintext socket and a TLS
 * socket a TLS server made (which node's `onread` option cannot reach), every byte arrives in
 * order through a pause and a resume, the socket does switch to the slabs on this node (so a
 * node release that breaks the switch fails here instead of going slow quietly), and slabs are
 * reused: a few for 32 MiB.
 */
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import net, { type AddressInfo } from 'node:net';
import { before, describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import tls from 'node:tls';
import { socketConnection } from '../../src/io/net.js';
import type { ReceiveSlabs } from '../../src/io/receive-slabs.js';
import type { Connection } from '../../src/io/transport.js';
import { generateIdentityPem } from '../../src/security/identity.js';

let pem: { key: string; cert: string };
before(async () => {
  pem = await generateIdentityPem('slab-reads-test');
});

const digest = (b: Buffer) => createHash('sha256').update(b).digest('hex');

/** A server on loopback whose accepted sockets go to `onSocket`, and a client connected to it. */
async function connected(
  transport: 'plaintext' | 'TLS',
  onSocket: (socket: net.Socket) => void,
): Promise<{ server: net.Server; client: net.Socket }> {
  const server =
    transport === 'TLS'
      ? tls.createServer({ key: pem.key, cert: pem.cert, minVersion: 'TLSv1.3' }, onSocket)
      : net.createServer(onSocket);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  const client =
    transport === 'TLS'
      ? tls.connect({ host: '127.0.0.1', port, rejectUnauthorized: false })
      : net.connect({ host: '127.0.0.1', port });
  await new Promise<void>((resolve) =>
    client.once(transport === 'TLS' ? 'secureConnect' : 'connect', resolve),
  );
  return { server, client };
}

for (const transport of ['plaintext', 'TLS'] as const) {
  describe(`an accepted ${transport} connection asked to read into slabs`, () => {
    it('delivers every byte in order, through a pause, from reused slabs', async () => {
      const received: Buffer[] = [];
      let memory: ReceiveSlabs | undefined;
      let connection: Connection | undefined;
      let closed!: () => void;
      const ended = new Promise<void>((resolve) => {
        closed = resolve;
      });
      const onSocket = (socket: net.Socket) => {
        connection = socketConnection(socket, {
          open: () => {},
          // The consumer copies what it needs and lets the chunk go at once (a session's queue
          // lets go of a chunk once all its bytes are taken).
          data: (chunk) => {
            received.push(Buffer.from(chunk));
            memory?.dropChunk(chunk);
          },
          close: () => closed(),
        });
        memory = connection.receiveIntoSlabs?.();
      };
      const { server, client } = await connected(transport, onSocket);
      try {
        const sent: Buffer[] = [];
        const send = async (bytes: number) => {
          for (let at = 0; at < bytes; at += 1024 * 1024) {
            const piece = randomBytes(1024 * 1024);
            sent.push(piece);
            if (!client.write(piece)) await new Promise((resolve) => client.once('drain', resolve));
          }
        };
        await send(16 * 1024 * 1024);
        for (let i = 0; i < 100 && received.reduce((n, b) => n + b.length, 0) < 16 * 1024 * 1024; i++)
          await sleep(20);
        connection!.pause();
        const before = received.reduce((n, b) => n + b.length, 0);
        const more = send(16 * 1024 * 1024);
        await sleep(200);
        assert.equal(
          received.reduce((n, b) => n + b.length, 0),
          before,
          'nothing is delivered while paused',
        );
        connection!.resume();
        await more;
        client.end();
        await ended;
        assert.equal(digest(Buffer.concat(received)), digest(Buffer.concat(sent)));
        assert.equal(connection!.readsIntoSlabs, true, 'the socket reads into the slabs on this node');
        assert.ok(memory!.allocated <= 4, `${memory!.allocated} slabs allocated for 32 MiB`);
        assert.equal(memory!.heldBytes, 0, 'nothing held once every chunk is let go of');
      } finally {
        client.destroy();
        server.close();
      }
    });

    it('stays paused when the owner pauses before the switch (in the very first chunk)', async () => {
      let got = 0;
      let connection: Connection | undefined;
      let first = true;
      const onSocket = (socket: net.Socket) => {
        connection = socketConnection(socket, {
          open: () => {},
          data: (chunk) => {
            got += chunk.length;
            memory?.dropChunk(chunk);
            if (first) connection!.pause(); // before the connection switches, after this chunk
            first = false;
          },
          close: () => {},
        });
        memory = connection.receiveIntoSlabs?.();
      };
      let memory: ReceiveSlabs | undefined;
      const { server, client } = await connected(transport, onSocket);
      try {
        client.write(Buffer.alloc(100)); // the first chunk alone
        for (let i = 0; i < 100 && got === 0; i++) await sleep(10);
        const total = 100 + 32 * 1024 * 1024;
        client.write(randomBytes(total - 100));
        await sleep(300);
        assert.ok(got < 16 * 1024 * 1024, `${got} bytes delivered while paused`);
        connection!.resume();
        for (let i = 0; i < 200 && got < total; i++) await sleep(20);
        assert.equal(got, total, 'all of it once resumed');
        assert.equal(connection!.readsIntoSlabs, true);
      } finally {
        client.destroy();
        server.close();
      }
    });
  });
}
