/**
 * Hostile peers on the replication link (I7), against real processes:
 * - random and mutated frames sent to a `volrep secondary` never crash it: it keeps answering a
 *   correct hello, and its replica is untouched (no valid update is ever sent);
 * - a primary whose volume id differs is refused with a clear reason, logged on both sides, and
 *   the primary's status never shows it connected;
 * - a fake secondary (a TCP server speaking the wire protocol) that sends garbage, acks for ids
 *   never sent, or an impossible welcome does not crash `volrep primary`: it drops the link, keeps
 *   the regions dirty and keeps serving NBD.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import net from 'node:net';
import { after, before, describe, it } from 'node:test';
import fc from 'fast-check';
import { ChunkQueue } from '../../src/io/chunk-queue.js';
import { NbdClient } from '../../src/nbd/client.js';
import { encodeFrame, FRAME_HEADER_BYTES, FrameDecoder, FrameType } from '../../src/replication/frames.js';
import {
  decodeMessage,
  encodeAck,
  encodeId,
  encodeJson,
  encodeUpdateHeader,
  type Message,
} from '../../src/replication/messages.js';
import { createVolumeCli, sha256File, waitFor } from '../helpers/clients.js';
import {
  type Daemon,
  type SecondaryDaemon,
  startPrimary,
  startSecondary,
  tempDir,
} from '../helpers/daemon.js';
import { getJson, Pair, REGION } from './pair.js';

const SIZE = 4 * 1024 * 1024;
const NUM_RUNS = Number(process.env.VOLREP_FC_RUNS ?? 30);

/** One end of a replication connection, speaking frames; collects decoded messages. */
class WireEnd {
  readonly inbox: Message[] = [];
  readonly queue = new ChunkQueue();
  private readonly decoder = new FrameDecoder();
  closed = false;
  private readonly closedPromise: Promise<void>;
  private waiters: (() => void)[] = [];

  constructor(readonly socket: net.Socket) {
    socket.on('error', () => {});
    socket.on('data', (chunk: Buffer) => {
      this.queue.push(chunk);
      for (;;) {
        const r = this.decoder.next(this.queue);
        if (r === undefined || r.kind === 'error') break;
        const m = decodeMessage(r.frame);
        if (m.type !== 'invalid') this.inbox.push(m);
      }
      for (const w of this.waiters.splice(0)) w();
    });
    this.closedPromise = new Promise((resolve) =>
      socket.once('close', () => {
        this.closed = true;
        for (const w of this.waiters.splice(0)) w();
        resolve();
      }),
    );
  }

  static async connect(address: string): Promise<WireEnd> {
    const at = address.lastIndexOf(':');
    const socket = net.connect({ host: address.slice(0, at), port: Number(address.slice(at + 1)) });
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', reject);
    });
    return new WireEnd(socket);
  }

  send(type: Parameters<typeof encodeFrame>[0], payload: Buffer[] = [], flags = 0): void {
    this.raw(Buffer.concat(encodeFrame(type, payload, flags)));
  }

  raw(bytes: Uint8Array): void {
    if (!this.socket.destroyed) this.socket.write(bytes);
  }

  async expect(pred: (m: Message) => boolean, what: string, timeoutMs = 5000): Promise<Message> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const i = this.inbox.findIndex(pred);
      if (i >= 0) return this.inbox.splice(i, 1)[0];
      if (this.closed) throw new Error(`connection closed while waiting for ${what}`);
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
      await new Promise<void>((resolve) => {
        this.waiters.push(resolve);
        setTimeout(resolve, 50);
      });
    }
  }

  /** Resolves true if the other side closed within `timeoutMs`. */
  async closedWithin(timeoutMs: number): Promise<boolean> {
    let timer: NodeJS.Timeout | undefined;
    const r = await Promise.race([
      this.closedPromise.then(() => true),
      new Promise<boolean>((resolve) => {
        timer = setTimeout(() => resolve(false), timeoutMs);
      }),
    ]);
    clearTimeout(timer);
    return r;
  }

  /** Half-closes our side and waits for the other side to close (destroying after `timeoutMs`). */
  async finish(timeoutMs = 3000): Promise<boolean> {
    this.socket.end();
    const closed = await this.closedWithin(timeoutMs);
    this.socket.destroy();
    await this.closedPromise;
    return closed;
  }
}

function helloFrame(volumeId: string, size = SIZE, regionSize = REGION): Buffer {
  return Buffer.concat(
    encodeFrame('hello', [
      encodeJson({
        volumeId,
        size,
        regionSize,
        role: 'primary',
        generations: { current: '00000000000000a1', base: null, history: [] },
      }),
    ]),
  );
}

function updateFrame(id: number, offset: number, data: Buffer, kind = 0, length = data.length, flags = 0) {
  const header = encodeUpdateHeader({ id, offset, length, kind: 'data', resync: false });
  header.writeUInt8(kind, 20);
  return Buffer.concat(encodeFrame('update', [header, data], flags));
}

/** A frame of any known type with a correct checksum around an arbitrary payload. */
const arbAnyFrame = fc
  .record({
    type: fc.constantFrom(...(Object.keys(FrameType) as (keyof typeof FrameType)[])),
    payload: fc.uint8Array({ maxLength: 96 }),
    flags: fc.nat({ max: 0xffff }),
  })
  .map(({ type, payload, flags }) => Buffer.concat(encodeFrame(type, [Buffer.from(payload)], flags)));

/** An update frame that is wrong in at least one way (kind, length, range, or id 0). */
const arbBadUpdate = fc
  .record({
    id: fc.oneof(fc.constant(0), fc.nat({ max: 2 ** 40 })),
    offset: fc.oneof(fc.nat({ max: SIZE }), fc.constant(SIZE - 1), fc.nat({ max: 2 ** 40 })),
    length: fc.oneof(fc.constant(0), fc.nat({ max: 4096 }), fc.constant(0xffffffff)),
    kind: fc.oneof(fc.nat({ max: 3 }), fc.nat({ max: 255 })),
    dataLength: fc.nat({ max: 4096 }),
  })
  .filter(
    ({ id, offset, length, kind, dataLength }) =>
      id === 0 ||
      kind > 2 ||
      length === 0 ||
      offset + length > SIZE ||
      (kind === 0 ? dataLength !== length : dataLength !== 0),
  )
  .map(({ id, offset, length, kind, dataLength }) =>
    updateFrame(id, offset, Buffer.alloc(dataLength, 0xee), kind, length),
  );

describe('hostile peers on the replication link', { timeout: 180_000 }, () => {
  describe('a volrep secondary under random and mutated frames', () => {
    let tmp: ReturnType<typeof tempDir>;
    let volume: string;
    let secondary: SecondaryDaemon;
    const volumeId = randomUUID();
    let zeroHash: string;

    before(async () => {
      tmp = tempDir('volrep-hostile-');
      volume = createVolumeCli(tmp.dir, 's.img', '4M', ['--secondary-of', volumeId]);
      zeroHash = await sha256File(volume);
      // Scripted primaries speak the wire protocol in the clear: TLS has its own tests (tls.test.ts).
      secondary = await startSecondary(volume, { http: true, extra: ['--insecure-plaintext'] });
    });
    after(async () => {
      await secondary?.kill();
      tmp?.cleanup();
    });

    /** Sends `bytes` on a fresh connection, closes it, and checks a correct hello still works. */
    async function attack(bytes: Uint8Array): Promise<void> {
      const bad = await WireEnd.connect(secondary.listen);
      bad.raw(bytes);
      await bad.finish();
      await stillHealthy();
    }

    async function stillHealthy(): Promise<void> {
      assert.equal(secondary.child.exitCode, null, `secondary exited:\n${secondary.stderr().slice(-3000)}`);
      assert.equal(secondary.child.signalCode, null, `secondary killed:\n${secondary.stderr().slice(-3000)}`);
      await waitFor(
        async () => (await getJson(secondary.http!, '/status')).peer.state === 'waiting',
        'the secondary to notice the hostile connection closed',
        5000,
      );
      const good = await WireEnd.connect(secondary.listen);
      good.raw(helloFrame(volumeId));
      const m = await good.expect((x) => x.type === 'welcome' || x.type === 'refuse', 'welcome');
      assert.equal(m.type, 'welcome', `a correct hello must be welcomed: ${JSON.stringify(m)}`);
      await good.finish();
    }

    it('random bytes, with and without a valid frame header in front', async () => {
      await fc.assert(
        fc.asyncProperty(fc.boolean(), fc.uint8Array({ maxLength: 512 }), async (withMagic, noise) => {
          const head = withMagic ? Buffer.from([0x56, 0x52, 0x50, 0x4c, 1]) : Buffer.alloc(0);
          await attack(Buffer.concat([head, noise]));
        }),
        { numRuns: NUM_RUNS },
      );
    });

    it('frames of every type with correct checksums but no hello first (even valid updates)', async () => {
      const validUpdate = updateFrame(1, 0, Buffer.alloc(4096, 0xee));
      await fc.assert(
        fc.asyncProperty(
          fc.array(fc.oneof(arbAnyFrame, fc.constant(validUpdate)), { maxLength: 4 }),
          async (fs) => {
            await attack(Buffer.concat([...fs, validUpdate]));
          },
        ),
        { numRuns: NUM_RUNS },
      );
    });

    it('a correct hello, then invalid updates or unexpected frames with correct checksums', async () => {
      const unexpected = fc.oneof(
        fc.constant(helloFrame(volumeId)),
        fc.constant(Buffer.concat(encodeFrame('ack', [encodeAck({ id: 1, consistent: true })]))),
        fc.constant(Buffer.concat(encodeFrame('keepAlive', [Buffer.from([1])]))),
        fc.constant(Buffer.concat(encodeFrame('barrier', [Buffer.alloc(7)]))),
        fc.constant(Buffer.concat(encodeFrame('welcome', [encodeJson({ role: 'secondary' })]))),
        fc.constant(Buffer.concat(encodeFrame('refuse', [Buffer.from('no')]))),
      );
      await fc.assert(
        fc.asyncProperty(fc.oneof(arbBadUpdate, unexpected), async (frame) => {
          await attack(Buffer.concat([helloFrame(volumeId), frame]));
        }),
        { numRuns: NUM_RUNS },
      );
    });

    it('a correct hello, then valid frames with one byte mutated at or before the only update', async () => {
      await fc.assert(
        fc.asyncProperty(
          fc.array(fc.constantFrom('keepAlive', 'barrier', 'resyncBegin'), { maxLength: 3 }),
          fc.nat({ max: SIZE / REGION - 1 }),
          fc.double({ min: 0, max: 1, noNaN: true, maxExcluded: true }),
          fc.integer({ min: 1, max: 255 }),
          async (before, region, where, xor) => {
            const frames = before.map((t) =>
              Buffer.concat(t === 'keepAlive' ? encodeFrame('keepAlive') : encodeFrame(t, [encodeId(0)])),
            );
            frames.push(updateFrame(1 + region, region * REGION, Buffer.alloc(REGION, 0xee)));
            const stream = Buffer.concat(frames);
            const at = Math.floor(where * stream.length);
            stream[at] ^= xor;
            await attack(Buffer.concat([helloFrame(volumeId), stream]));
          },
        ),
        { numRuns: NUM_RUNS },
      );
    });

    it('wrong volume id, size or region size: refused with a reason', async () => {
      for (const [hello, pattern] of [
        [helloFrame(randomUUID()), /volume id mismatch/],
        [helloFrame(volumeId, SIZE * 2), /size mismatch/],
        [helloFrame(volumeId, SIZE, REGION * 2), /region size mismatch/],
      ] as const) {
        await waitFor(
          async () => (await getJson(secondary.http!, '/status')).peer.state === 'waiting',
          'the secondary to be free for the next primary',
          5000,
        );
        const p = await WireEnd.connect(secondary.listen);
        p.raw(hello);
        const m = await p.expect((x) => x.type === 'refuse', 'refuse');
        assert.match(m.type === 'refuse' ? m.refusal.reason : '', pattern);
        await p.finish();
      }
      await stillHealthy();
    });

    it('after all that, the replica is untouched and nothing was applied', async () => {
      const status = await getJson(secondary.http!, '/status');
      assert.equal(status.lastAppliedUpdate, 0, JSON.stringify(status));
      assert.equal(await sha256File(volume), zeroHash, 'no byte of the replica may have changed');
      assert.doesNotMatch(secondary.stderr(), /"level":(50|60)/, 'no error-level log lines');
    });
  });

  describe('a primary whose volume id differs from the replica', () => {
    let pair: Pair | undefined;
    after(async () => {
      await pair?.cleanup();
    });

    it('is refused with a clear message and never shows connected', async () => {
      pair = new Pair({ size: '4M' }, randomUUID());
      await pair.start();
      const p = pair;
      await waitFor(
        () => /volume id mismatch/.test(p.primary!.stderr()),
        'the primary to log the refusal',
        10_000,
      );
      assert.match(p.primary!.stderr(), /secondary refused this primary/);
      assert.ok(
        p
          .secondary!.stderr()
          .split('\n')
          .some((line) => line.includes('"refused primary"') && line.includes('volume id mismatch')),
        `the secondary logs the refusal with its reason:\n${p.secondary!.stderr()}`,
      );
      for (let i = 0; i < 5; i++) {
        const s = await p.primaryStatus();
        assert.notEqual(s.peer.state, 'connected', JSON.stringify(s));
        assert.notEqual(s.peer.state, 'resyncing', JSON.stringify(s));
        assert.equal(await p.primaryMetric('volrep_peer_connected'), 0);
        // Sampled over a second: each reconnection attempt is refused again.
        await new Promise((resolve) => setTimeout(resolve, 200));
      }
      const sec = await p.secondaryStatus();
      assert.equal(sec.lastAppliedUpdate, 0);
    });
  });

  describe('volrep primary against a fake secondary', () => {
    let tmp: ReturnType<typeof tempDir>;
    let server: net.Server;
    let primary: Daemon;
    const connections: WireEnd[] = [];
    let connWaiters: (() => void)[] = [];
    let taken = 0;

    async function nextConnection(timeoutMs = 8000): Promise<WireEnd> {
      await waitFor(
        () => connections.length > taken,
        `the primary to connect (log:\n${primary?.stderr().slice(-2000)})`,
        timeoutMs,
        10,
      );
      return connections[taken++];
    }

    /** Accepts the primary's next connection, reads its hello and welcomes it. */
    async function welcomed(lastAppliedUpdate = 0): Promise<WireEnd> {
      const c = await nextConnection();
      const h = await c.expect((m) => m.type === 'hello', 'hello');
      assert.ok(h.type === 'hello');
      c.send('welcome', [
        encodeJson({
          ...h.hello,
          role: 'secondary',
          lastAppliedUpdate,
          consistent: true,
          dirtyRegions: 0,
        }),
      ]);
      return c;
    }

    async function nbdStillServes(): Promise<void> {
      assert.equal(primary.child.exitCode, null, `primary exited:\n${primary.stderr().slice(-3000)}`);
      assert.equal(primary.child.signalCode, null, `primary killed:\n${primary.stderr().slice(-3000)}`);
      const client = await NbdClient.connect(primary.nbd.host, primary.nbd.port, 'volrep');
      const data = Buffer.alloc(8192, 0x3c);
      await client.write(SIZE - 8192, data);
      assert.deepEqual(await client.read(SIZE - 8192, 8192), data);
      await client.close();
      await getJson(primary.http!, '/status');
    }

    before(async () => {
      tmp = tempDir('volrep-fake-secondary-');
      server = net.createServer((socket) => {
        connections.push(new WireEnd(socket));
        for (const w of connWaiters.splice(0)) w();
      });
      await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
      const port = (server.address() as net.AddressInfo).port;
      const volume = createVolumeCli(tmp.dir, 'p.img', '4M');
      primary = await startPrimary(volume, {
        http: true,
        extra: [
          '--peer',
          `127.0.0.1:${port}`,
          '--insecure-plaintext',
          '--assume-clean',
          '--ack-timeout',
          '2s',
        ],
      });
    });
    after(async () => {
      connWaiters = [];
      await primary?.kill();
      for (const c of connections) c.socket.destroy();
      await new Promise<void>((resolve) => server?.close(() => resolve()));
      tmp?.cleanup();
    });

    it('garbage after the welcome: the primary drops the link and keeps serving', async () => {
      const c = await welcomed();
      await waitFor(
        async () => ['connected', 'resyncing'].includes((await getJson(primary.http!, '/status')).peer.state),
        'the link up',
      );
      c.raw(Buffer.from('this is not a volrep frame at all, not even close'));
      assert.ok(await c.closedWithin(5000), 'the primary must close a link that sends garbage');
      await nbdStillServes();
    });

    it('an ack for an id never sent: link dropped, the region stays dirty', async () => {
      const c = await welcomed();
      await waitFor(
        async () => ['connected', 'resyncing'].includes((await getJson(primary.http!, '/status')).peer.state),
        'the link up',
      );
      const client = await NbdClient.connect(primary.nbd.host, primary.nbd.port, 'volrep');
      await client.write(3 * REGION, Buffer.alloc(4096, 0x77));
      await client.close();
      const u = await c.expect((m) => m.type === 'update' && m.update.offset === 3 * REGION, 'the update');
      assert.ok(u.type === 'update');
      c.send('ack', [encodeAck({ id: u.update.id + 1000, consistent: true })]);
      assert.ok(await c.closedWithin(5000), 'the primary must drop a link that acks ids never sent');
      assert.match(primary.stderr(), /bad ack/);
      const dirty = (await getJson(primary.http!, '/dirty')) as { ranges: [number, number][] };
      assert.ok(
        dirty.ranges.some(([first, last]) => first <= 3 && 3 <= last),
        `region 3 must stay dirty: ${JSON.stringify(dirty)}`,
      );
      await nbdStillServes();
    });

    it('a welcome claiming updates never issued: link dropped', async () => {
      const c = await welcomed(2 ** 40);
      assert.ok(await c.closedWithin(5000), 'the primary must drop a secondary claiming ids it never issued');
      assert.match(primary.stderr(), /secondary state does not fit this primary/);
      await nbdStillServes();
    });

    it('garbage instead of a welcome: no crash', async () => {
      for (const reply of [
        Buffer.from('HTTP/1.1 400 Bad Request\r\n\r\n'),
        Buffer.concat(encodeFrame('ack', [encodeAck({ id: 5, consistent: true })])),
        Buffer.concat(encodeFrame('welcome', [Buffer.from('{"role":"secondary"')])),
        Buffer.alloc(FRAME_HEADER_BYTES, 0xff),
      ]) {
        const c = await nextConnection();
        await c.expect((m) => m.type === 'hello', 'hello');
        c.raw(reply);
        assert.ok(
          await c.closedWithin(5000),
          `the primary must close after ${JSON.stringify(reply.toString())}`,
        );
      }
      await nbdStillServes();
    });

    it('random frames and bytes after a welcome never crash the primary', async () => {
      const arbAck = fc
        .tuple(fc.nat({ max: 2 ** 45 }), fc.boolean())
        .map(([id, consistent]) => Buffer.concat(encodeFrame('ack', [encodeAck({ id, consistent })])));
      await fc.assert(
        fc.asyncProperty(
          fc.array(
            fc.oneof(
              arbAnyFrame,
              arbAck,
              fc.uint8Array({ maxLength: 64 }).map((b) => Buffer.from(b)),
            ),
            {
              minLength: 1,
              maxLength: 4,
            },
          ),
          async (chunks) => {
            const c = await welcomed();
            for (const chunk of chunks) c.raw(chunk);
            // Whatever the primary made of it, end this link so that the next run gets a new one.
            await c.closedWithin(100);
            c.socket.destroy();
            assert.equal(primary.child.exitCode, null, `primary exited:\n${primary.stderr().slice(-3000)}`);
          },
        ),
        { numRuns: NUM_RUNS },
      );
      await nbdStillServes();
      assert.doesNotMatch(primary.stderr(), /"level":60/, 'no fatal log lines');
    });
  });
});
