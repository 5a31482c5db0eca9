/**
 * Receive slabs: a slab is reused only when nothing holds it (queue chunks, payload views), never
 * after a failed request abandoned it; and a real accepted socket, moved to pooled reads, delivers
 * every byte in order, pauses, ends, and lets its server close.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { describe, it } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import pino from 'pino';
import type { BlockDevice } from '../../src/io/block-device.js';
import { ChunkQueue } from '../../src/io/chunk-queue.js';
import {
  adoptWithPooledReads,
  FIRST_READ_BYTES,
  FREE_SLABS_MAX,
  READ_BYTES_MIN,
  ReceiveSlabs,
  SLAB_BYTES,
} from '../../src/io/receive-slabs.js';
import type { TlsAcceptor } from '../../src/io/tls-acceptor.js';
import { NbdClient } from '../../src/nbd/client.js';
import { IN_FLIGHT_BYTES_MAX, NbdServer } from '../../src/nbd/server.js';
import { FileDevice } from '../../src/volume/file-device.js';

/** Simulates one read of `n` bytes (what node does with the buffer it is given). */
function read(slabs: ReceiveSlabs, n: number, fill = 0): Buffer {
  const buffer = slabs.nextReadBuffer();
  assert.ok(buffer.length >= n, 'a read never gets less room than it needs here');
  buffer.fill(fill, 0, n);
  return slabs.filled(buffer, n);
}

/** Slabs past the negotiation, reading into full slabs already (the first buffer is small). */
function bulkSlabs(): ReceiveSlabs {
  const slabs = new ReceiveSlabs();
  slabs.negotiated();
  slabs.dropChunk(read(slabs, 1));
  return slabs;
}

/** A read that leaves too little of the current slab for another, so the next moves on. */
function fillSlab(slabs: ReceiveSlabs): Buffer[] {
  const room = slabs.nextReadBuffer().length;
  return [read(slabs, room - (READ_BYTES_MIN - 1))];
}

describe('receive slabs', () => {
  it('reads follow each other in a slab, each into the memory it was given', () => {
    const slabs = bulkSlabs();
    const a = read(slabs, 1000, 1);
    const b = read(slabs, 2000, 2);
    assert.equal(a.buffer, b.buffer);
    assert.equal(b.byteOffset, a.byteOffset + 1000);
    assert.ok(a.every((x) => x === 1));
    assert.throws(() => slabs.filled(Buffer.alloc(10), 10), /outside the buffer/);
    assert.throws(() => slabs.filled(a, 10), /outside the buffer/, 'an old buffer is not the next read');
  });

  it('a slab still held by a queued chunk or a payload is not reused; once let go, it is', () => {
    const slabs = bulkSlabs();
    const queue = new ChunkQueue((chunk) => slabs.dropChunk(chunk));
    const chunks = fillSlab(slabs);
    for (const c of chunks) queue.push(c);
    const first = chunks[0].buffer;
    const payload = queue.takeViews(100);
    slabs.hold(payload);
    queue.discard(queue.length); // every chunk dropped: only the payload holds the slab
    const next = read(slabs, 10);
    assert.notEqual(next.buffer, first, 'a held slab must not be read into');
    fillSlab(slabs);
    slabs.dropChunk(next);
    slabs.release(payload);
    const again = read(slabs, 10);
    assert.equal(again.buffer, first, 'the slab nothing holds is reused');
    assert.equal(slabs.allocated, 2);
  });

  it('a slab of a failed request is never reused', () => {
    const slabs = bulkSlabs();
    const chunks = fillSlab(slabs);
    const first = chunks[0].buffer;
    slabs.hold([chunks[0]]);
    for (const c of chunks) slabs.dropChunk(c);
    slabs.abandon([chunks[0]]);
    for (let i = 0; i < 5; i++) {
      const next = read(slabs, 10);
      assert.notEqual(next.buffer, first);
      slabs.dropChunk(next);
      for (const c of fillSlab(slabs)) slabs.dropChunk(c);
    }
  });

  it('negotiates in one small buffer, reused while nothing holds it', () => {
    const slabs = new ReceiveSlabs();
    for (let i = 0; i < 100; i++) slabs.dropChunk(read(slabs, 100));
    assert.equal(slabs.allocated, 0, 'no slab for a connection that only negotiates');
    assert.ok(slabs.nextReadBuffer().length <= FIRST_READ_BYTES);
    slabs.negotiated();
    slabs.dropChunk(read(slabs, 100));
    assert.equal(slabs.nextReadBuffer().length, SLAB_BYTES, 'requests are read into slabs');
  });

  it('counts the memory held, and lets free slabs over the bound go as soon as they are free', () => {
    const slabs = bulkSlabs();
    const held: Buffer[] = [];
    for (let i = 0; i < FREE_SLABS_MAX + 6; i++) held.push(...fillSlab(slabs));
    assert.equal(slabs.heldBytes, held.length * SLAB_BYTES);
    for (const c of held) slabs.dropChunk(c);
    assert.equal(slabs.heldBytes, 0);
    assert.ok(slabs.kept <= FREE_SLABS_MAX + 1, `${slabs.kept} slabs kept once nothing holds them`);
  });

  it('counts a view held right after its slab was let go (a chunk dropped before the update in it is held)', () => {
    const slabs = bulkSlabs();
    const held: Buffer[] = [];
    for (let i = 0; i < FREE_SLABS_MAX + 6; i++) held.push(...fillSlab(slabs));
    const last = held.slice(-4); // chunks of one of the last slabs filled
    for (const c of held.slice(0, -4)) slabs.dropChunk(c);
    // The queue drops the last chunks of a slab (over the bound of free slabs: let go of), then
    // the owner holds an update's data in it.
    const update = [last[1].subarray(10, 20)];
    for (const c of last) slabs.dropChunk(c);
    slabs.hold(update);
    assert.equal(slabs.heldBytes, SLAB_BYTES, 'the view held counts');
    // Its slab is not handed out again while held.
    const reads: Buffer[] = [];
    for (let i = 0; i < FREE_SLABS_MAX + 4; i++) reads.push(...fillSlab(slabs));
    assert.ok(
      reads.every((r) => r.buffer !== update[0].buffer),
      'a held slab is not read into',
    );
    slabs.release(update);
    for (const r of reads) slabs.dropChunk(r);
    assert.equal(slabs.heldBytes, 0);
  });

  it('keeps at most FREE_SLABS_MAX free slabs besides the one in use', () => {
    const slabs = bulkSlabs();
    // Hold many slabs at once, then let them all go.
    const held: Buffer[] = [];
    for (let i = 0; i < FREE_SLABS_MAX + 6; i++) held.push(...fillSlab(slabs));
    const count = slabs.allocated;
    for (const c of held) slabs.dropChunk(c);
    // Cycle through the slabs: the free ones are reused, those over the bound are forgotten.
    for (let i = 0; i < FREE_SLABS_MAX + 6; i++) for (const c of fillSlab(slabs)) slabs.dropChunk(c);
    assert.equal(slabs.allocated, count, 'free slabs are reused before any new one');
    assert.ok(
      slabs.kept <= FREE_SLABS_MAX + 2,
      `${slabs.kept} slabs kept (${(slabs.kept * SLAB_BYTES) / 2 ** 20} MiB) once nothing holds them`,
    );
  });
});

describe('an accepted socket moved to pooled reads', { timeout: 20_000 }, () => {
  it('delivers every byte in order, pauses and resumes, ends, and its server closes', async () => {
    const data = randomBytes(24 * 1024 * 1024);
    const received: Buffer[] = [];
    let total = 0;
    let pausedOnce = false;
    const slabs = new ReceiveSlabs();
    slabs.negotiated();
    const queue = new ChunkQueue((chunk) => slabs.dropChunk(chunk));
    const done = new Promise<void>((resolve, reject) => {
      const server = net.createServer({ pauseOnConnect: true }, (accepted) => {
        let socket: net.Socket | undefined;
        socket = adoptWithPooledReads(accepted, slabs, (chunk) => {
          queue.push(chunk);
          // Copy out what arrived (the slab is reused once the queue drops it).
          const copy = Buffer.from(queue.take(queue.length));
          received.push(copy);
          total += copy.length;
          if (!pausedOnce && total > 4 * 1024 * 1024) {
            pausedOnce = true;
            socket!.pause();
            setTimeout(() => socket!.resume(), 50);
          }
        });
        if (socket === undefined) return reject(new Error('this node cannot move an accepted socket'));
        socket.on('error', reject);
        socket.on('end', () => socket!.end());
        socket.on('close', () => server.close(() => resolve()));
      });
      server.listen(0, '127.0.0.1', () => {
        const { port } = server.address() as net.AddressInfo;
        const client = net.connect(port, '127.0.0.1', () => client.end(data));
        client.on('error', reject);
        client.resume();
      });
    });
    await done;
    assert.equal(total, data.length);
    assert.ok(Buffer.concat(received).equals(data), 'the bytes arrive as they were sent');
    assert.ok(pausedOnce);
    assert.ok(slabs.allocated <= 3, `slabs are reused (${slabs.allocated} allocated for 24 MiB)`);
  });

  it('leaves a socket that is already reading as it is', async () => {
    const server = net.createServer((accepted) => {
      const slabs = new ReceiveSlabs();
      assert.equal(
        adoptWithPooledReads(accepted, slabs, () => {}),
        undefined,
      );
      accepted.destroy();
      server.close();
    });
    await new Promise<void>((resolve) => {
      server.listen(0, '127.0.0.1', () => {
        const { port } = server.address() as net.AddressInfo;
        const client = net.connect(port, '127.0.0.1');
        client.on('error', () => {});
        client.on('close', () => resolve());
      });
    });
  });
});

describe('the NBD server with pooled reads', { timeout: 30_000 }, () => {
  it('reads into slabs where the device lets go of written data, and the data lands intact', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'volrep-slabs-'));
    const file = path.join(dir, 'volume.img');
    const size = 64 * 1024 * 1024;
    fs.writeFileSync(file, Buffer.alloc(0));
    fs.truncateSync(file, size);
    const fd = fs.openSync(file, 'r+');
    const logger = pino({ level: 'silent' });
    const server = new NbdServer(new FileDevice(fd, size), { exportName: 'v', logger });
    try {
      assert.equal(server.pooledReads, true);
      const { port } = await server.listen('127.0.0.1', 0);
      const client = await NbdClient.connect('127.0.0.1', port, 'v');
      // Large writes, 8 in flight (the bench's 1 MiB QD8, off the slab size), over the volume
      // twice: slabs are reused while earlier writes still run, and the second pass must win.
      const piece = 1024 * 1024 + 4096;
      let data = Buffer.alloc(0);
      for (let pass = 0; pass < 2; pass++) {
        data = randomBytes(size);
        const offsets: number[] = [];
        for (let at = 0; at < size; at += piece) offsets.push(at);
        const lane = async () => {
          for (let at = offsets.shift(); at !== undefined; at = offsets.shift())
            await client.write(at, data.subarray(at, at + piece));
        };
        await Promise.all(Array.from({ length: 8 }, lane));
      }
      await client.flush();
      await client.close();
      await server.close();
      assert.equal(server.pooledConnections, 1);
      assert.ok(fs.readFileSync(file).equals(data), 'the volume holds what was written last');
      // 128 MiB received: far fewer slabs than that, or they are not reused.
      assert.ok(server.slabsAllocated <= 12, `${server.slabsAllocated} slabs of 2 MiB allocated`);
    } finally {
      await server.close();
      fs.closeSync(fd);
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('bounds the receive memory unfinished writes hold, not only their bytes', async () => {
    // Small writes that each keep a slab to themselves (a large rejected write after each moves
    // the reads on), against a device that completes nothing until told: the connection must
    // stop reading once the slabs held reach the in-flight bound.
    const size = 8 * 1024 * 1024;
    const parked: Array<() => void> = [];
    let parking = true;
    const device: BlockDevice = {
      size,
      readOnly: false,
      reportsRelease: true,
      read: (_o, _l, _b, _a, done) => done(null),
      write: (_o, _d, _l, _f, done, released) => {
        const finish = () => {
          released?.(true);
          done(null);
        };
        if (parking) parked.push(finish);
        else finish();
      },
      writeZeroes: (_o, _l, _f, done) => done(null),
      trim: (_o, _l, _f, done) => done(null),
      flush: (done) => done(null),
    };
    const server = new NbdServer(device, { exportName: 'v', logger: pino({ level: 'silent' }) });
    const { port } = await server.listen('127.0.0.1', 0);
    const client = await NbdClient.connect('127.0.0.1', port, 'v');
    try {
      const filler = Buffer.alloc(SLAB_BYTES - READ_BYTES_MIN);
      const writes: Promise<unknown>[] = [];
      for (let i = 0; i < 80; i++) {
        writes.push(client.write(i * 512, Buffer.alloc(512, i)));
        writes.push(client.write(size, filler).catch(() => 'refused')); // past the end: rejected
      }
      await sleep(1000);
      const bound = IN_FLIGHT_BYTES_MAX / SLAB_BYTES + 4;
      assert.ok(parked.length < 80, `${parked.length} writes taken in while their slabs are held`);
      assert.ok(server.slabsAllocated <= bound, `${server.slabsAllocated} slabs allocated (bound ${bound})`);
      // Complete what is parked until every write has its reply (the connection reads on).
      const all = Promise.all(writes).then(() => true);
      for (let finished = false; !finished; ) {
        for (const finish of parked.splice(0)) finish();
        finished = await Promise.race([all, sleep(20).then(() => false)]);
      }
      assert.ok(server.slabsAllocated <= 2 * bound, `${server.slabsAllocated} slabs allocated in all`);
      await client.close();
    } finally {
      parking = false; // a failed check must not leave the server waiting on parked writes
      for (const finish of parked.splice(0)) finish();
      await server.close();
    }
  });

  it('keeps a slab until the device lets go of it, after the write completed, and reads on then', async () => {
    // A replicating primary completes a write once it is on the volume and lets go of its data
    // once it is sent on. Here a device that completes at once and lets go only when told: the
    // data stays as written until then, the connection stops reading at the bound on held
    // memory (every request already answered), and reads on as the device lets go.
    const size = 128 * 1024 * 1024;
    const unreleased: Array<{ data: Buffer[]; expected: Buffer; release: () => void }> = [];
    const device: BlockDevice = {
      size,
      readOnly: false,
      reportsRelease: true,
      read: (_o, _l, _b, _a, done) => done(null),
      write: (_o, data, _l, _f, done, released) => {
        unreleased.push({ data, expected: Buffer.concat(data), release: () => released?.(true) });
        done(null);
      },
      writeZeroes: (_o, _l, _f, done) => done(null),
      trim: (_o, _l, _f, done) => done(null),
      flush: (done) => done(null),
    };
    const server = new NbdServer(device, { exportName: 'v', logger: pino({ level: 'silent' }) });
    const { port } = await server.listen('127.0.0.1', 0);
    const client = await NbdClient.connect('127.0.0.1', port, 'v');
    const intact = (w: (typeof unreleased)[number]) => Buffer.concat(w.data).equals(w.expected);
    try {
      const count = 96; // 96 MiB: over the 64 MiB bound on held receive memory
      let answered = 0;
      const writes = Array.from({ length: count }, (_, i) =>
        client.write(i * 1024 * 1024, randomBytes(1024 * 1024)).then(() => answered++),
      );
      await sleep(500);
      assert.ok(
        unreleased.length < count,
        `${unreleased.length} of ${count} writes taken in with nothing let go`,
      );
      assert.equal(answered, unreleased.length, 'every write taken in is answered');
      assert.ok(unreleased.every(intact), 'data not let go of is left as it was');
      // Let go of them as they come, checking each is still as written, until all are answered.
      const all = Promise.all(writes).then(() => true);
      const deadline = Date.now() + 10_000;
      for (let finished = false; !finished; ) {
        assert.ok(Date.now() < deadline, `${answered} of ${count} answered: the connection stopped reading`);
        for (const w of unreleased.splice(0)) {
          assert.ok(intact(w), 'data not let go of is left as it was');
          w.release();
        }
        finished = await Promise.race([all, sleep(20).then(() => false)]);
      }
      assert.equal(answered, count);
      await client.close();
    } finally {
      for (const w of unreleased.splice(0)) w.release();
      await server.close();
    }
  });

  it('does not where the connection may turn into TLS, or the device does not say when it lets go', () => {
    const logger = pino({ level: 'silent' });
    const device = new FileDevice(-1, 4096);
    const acceptor = {} as TlsAcceptor;
    const tls = new NbdServer(device, {
      exportName: 'v',
      logger,
      tls: { mode: 'on', acceptor, requireClientCert: false },
    });
    assert.equal(tls.pooledReads, false);
    const keeps = { ...device, size: 4096, readOnly: false, reportsRelease: false } as never;
    assert.equal(new NbdServer(keeps, { exportName: 'v', logger }).pooledReads, false);
  });
});
