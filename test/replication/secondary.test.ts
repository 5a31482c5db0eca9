import assert from 'node:assert/strict';
import { randomBytes, randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import pino from 'pino';
import { type RunningSecondary, startSecondary } from '../../src/daemon/secondary.js';
import { ChunkQueue } from '../../src/io/chunk-queue.js';
import { encodeFrame, FrameDecoder } from '../../src/replication/frames.js';
import {
  decodeMessage,
  encodeId,
  encodeJson,
  encodeUpdateHeader,
  type Message,
} from '../../src/replication/messages.js';
import { createVolume } from '../../src/volume/volume.js';
import { tempDir } from '../helpers/daemon.js';

const SIZE = 4 * 1024 * 1024;
const REGION = 64 * 1024;

/** A scripted primary speaking the wire protocol directly. */
class FakePrimary {
  private readonly queue = new ChunkQueue();
  private readonly decoder = new FrameDecoder();
  private readonly inbox: Message[] = [];
  private waiters: (() => void)[] = [];
  closed = false;

  private constructor(private readonly socket: net.Socket) {
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
    socket.on('close', () => {
      this.closed = true;
      for (const w of this.waiters.splice(0)) w();
    });
    socket.on('error', () => {});
  }

  static async connect(port: number): Promise<FakePrimary> {
    const socket = net.connect({ host: '127.0.0.1', port });
    await new Promise((resolve) => socket.once('connect', resolve));
    return new FakePrimary(socket);
  }

  send(type: Parameters<typeof encodeFrame>[0], payload: Buffer[] = [], flags = 0): void {
    this.socket.write(Buffer.concat(encodeFrame(type, payload, flags)));
  }

  hello(volumeId: string, size = SIZE, regionSize = REGION): void {
    this.send('hello', [
      encodeJson({
        volumeId,
        size,
        regionSize,
        role: 'primary',
        generations: { current: '00000000000000a1', base: null, history: [] },
      }),
    ]);
  }

  update(id: number, offset: number, data: Buffer): void {
    this.send('update', [
      encodeUpdateHeader({ id, offset, length: data.length, kind: 'data', resync: false }),
      data,
    ]);
  }

  /** Waits for a message matching `pred`, removing it from the inbox. */
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

  async waitClosed(timeoutMs = 5000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!this.closed) {
      if (Date.now() > deadline) throw new Error('connection not closed');
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }

  close(): void {
    this.socket.destroy();
  }
}

describe('secondary', () => {
  const { dir, cleanup } = tempDir();
  const volumePath = path.join(dir, 'replica.img');
  const volumeId = randomUUID();
  let secondary: RunningSecondary;
  let port: number;
  const logger = pino({ level: 'silent' });

  const start = async () => {
    secondary = await startSecondary({
      volumePath,
      listen: { host: '127.0.0.1', port: 0 },
      link: { mode: 'insecure-plaintext' }, // a scripted primary speaking the wire protocol in the clear
      logger,
    });
    port = Number(secondary.listenAddress.split(':').pop());
  };

  before(async () => {
    await createVolume({ volumePath, size: SIZE, role: 'secondary', volumeId, logSize: 64 * 1024 });
    await start();
  });
  after(async () => {
    await secondary.close();
    cleanup();
  });

  it('refuses a primary with another volume id, size or region size, with a clear reason', async () => {
    for (const [id, size, region, pattern] of [
      [randomUUID(), SIZE, REGION, /volume id mismatch/],
      [volumeId, SIZE * 2, REGION, /size mismatch/],
      [volumeId, SIZE, REGION * 2, /region size mismatch/],
    ] as const) {
      const p = await FakePrimary.connect(port);
      p.hello(id, size, region);
      const m = await p.expect((x) => x.type === 'refuse', 'refuse');
      assert.match(m.type === 'refuse' ? m.refusal.reason : '', pattern);
      await p.waitClosed();
    }
  });

  it('welcomes the right primary, applies updates in order and acks them (durability: applier-durability.test.ts)', async () => {
    const p = await FakePrimary.connect(port);
    p.hello(volumeId);
    const w = await p.expect((m) => m.type === 'welcome', 'welcome');
    assert.deepEqual(w.type === 'welcome' && [w.welcome.lastAppliedUpdate, w.welcome.consistent], [0, false]);
    const a = randomBytes(8192);
    const b = randomBytes(4096);
    p.update(1, 60 * 1024, a);
    p.update(2, 62 * 1024, b); // overlaps the first: order matters
    p.send('update', [
      encodeUpdateHeader({ id: 3, offset: 1024 * 1024, length: 65536, kind: 'zero', resync: false }),
    ]);
    p.send('barrier', [encodeId(3)]);
    let acked = 0;
    while (acked < 3) {
      const m = await p.expect((x) => x.type === 'ack', 'ack');
      if (m.type === 'ack') acked = m.ack.id;
    }
    assert.equal(acked, 3);
    const file = readFileSync(volumePath);
    const expected = Buffer.from(a);
    b.copy(expected, 2 * 1024);
    assert.ok(file.subarray(60 * 1024, 68 * 1024).equals(expected));
    assert.equal(secondary.status().lastAppliedUpdate, 3);
    assert.equal(secondary.status().peer.state, 'connected');

    // An id that goes backwards breaks the stream's rules: the connection is dropped.
    p.update(2, 0, Buffer.alloc(512, 1));
    await p.waitClosed();
    assert.equal(readFileSync(volumePath).subarray(0, 512).equals(Buffer.alloc(512)), true);
  });

  it('marks the replica inconsistent during a resync and consistent after, durably across restarts', async () => {
    const p = await FakePrimary.connect(port);
    p.hello(volumeId);
    await p.expect((m) => m.type === 'welcome', 'welcome');
    p.send('resyncBegin', [encodeId(3)]);
    p.update(4, 0, randomBytes(REGION));
    // Wait until update 4 is durable; the replica must be inconsistent now.
    await p.expect((m) => m.type === 'ack' && m.ack.id === 4, 'ack 4');
    assert.equal(secondary.status().consistent, false);
    p.send('resyncEnd', [encodeId(4)]);
    const deadline = Date.now() + 5000;
    while (!secondary.status().consistent && Date.now() < deadline)
      await new Promise((r) => setTimeout(r, 20));
    assert.equal(secondary.status().consistent, true);
    p.close();
    await secondary.close();
    await start();
    assert.deepEqual([secondary.status().lastAppliedUpdate, secondary.status().consistent], [4, true]);
  });

  it('drops a connection that sends garbage, and keeps serving the next one', async () => {
    const sock = net.connect({ host: '127.0.0.1', port });
    await new Promise((resolve) => sock.once('connect', resolve));
    sock.on('error', () => {});
    sock.write(randomBytes(100));
    await new Promise((resolve) => sock.once('close', resolve));
    const p = await FakePrimary.connect(port);
    p.hello(volumeId);
    const w = await p.expect((m) => m.type === 'welcome', 'welcome');
    assert.equal(w.type === 'welcome' && w.welcome.lastAppliedUpdate, 4);
    p.close();
  });
});
