/**
 * Hostile clients against a live NbdServer over real TCP: random and mutated byte streams,
 * garbage around the handshake, bad and oversize requests, half-closed and reset sockets. The
 * volume is a FileDevice over a temp file wrapped in a spy that sees every I/O the server issues.
 * After each run: the server still serves a well-behaved client, every I/O it issued was an
 * accepted request of some hostile stream (per the reference model), and the file is unchanged
 * outside the ranges that such requests or the well-behaved client wrote.
 */
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it, mock } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import fc from 'fast-check';
import pino from 'pino';
import type { BlockDevice, Done, Released } from '../../src/io/block-device.js';
import { ChunkQueue } from '../../src/io/chunk-queue.js';
import { NbdClient } from '../../src/nbd/client.js';
import { Handshake } from '../../src/nbd/handshake.js';
import * as P from '../../src/nbd/protocol.js';
import { HANDSHAKE_TIMEOUT_MS, NbdServer } from '../../src/nbd/server.js';
import { FileDevice } from '../../src/volume/file-device.js';
import {
  arbCuts,
  arbMutation,
  clientFlags,
  fcParams,
  infoData,
  isWriteCommand,
  type Limits,
  metaData,
  mutate,
  option,
  type RefRequest,
  refParse,
  requestHeader,
  splitAt,
} from './wire.js';

const MiB = 1024 * 1024;
const SIZE = 4 * MiB;
const EXPORT_NAME = 'volrep';
const logger = pino({ level: 'silent' });

// ---------------------------------------------------------------------------------------------
// A BlockDevice that records every call the server makes.

interface IoCall {
  op: 'read' | 'write' | 'writeZeroes' | 'trim' | 'flush';
  offset: number;
  length: number;
  digest?: string;
}

function digest(parts: Buffer[]): string {
  const h = createHash('sha1');
  for (const p of parts) h.update(p);
  return h.digest('hex');
}

class SpyDevice implements BlockDevice {
  calls: IoCall[] = [];
  inFlight = 0;
  constructor(private readonly inner: BlockDevice) {}
  get size(): number {
    return this.inner.size;
  }
  get readOnly(): boolean {
    return this.inner.readOnly;
  }
  get reportsRelease(): boolean | undefined {
    return this.inner.reportsRelease;
  }
  private wrap(done: Done): Done {
    this.inFlight++;
    return (err) => {
      this.inFlight--;
      done(err);
    };
  }
  read(offset: number, length: number, buf: Buffer, at: number, done: Done): void {
    this.calls.push({ op: 'read', offset, length });
    this.inner.read(offset, length, buf, at, this.wrap(done));
  }
  write(offset: number, data: Buffer[], length: number, fua: boolean, done: Done, released?: Released): void {
    this.calls.push({ op: 'write', offset, length, digest: digest(data) });
    this.inner.write(offset, data, length, fua, this.wrap(done), released);
  }
  writeZeroes(offset: number, length: number, fua: boolean, done: Done): void {
    this.calls.push({ op: 'writeZeroes', offset, length });
    this.inner.writeZeroes(offset, length, fua, this.wrap(done));
  }
  trim(offset: number, length: number, fua: boolean, done: Done): void {
    this.calls.push({ op: 'trim', offset, length });
    this.inner.trim(offset, length, fua, this.wrap(done));
  }
  flush(done: Done): void {
    this.calls.push({ op: 'flush', offset: 0, length: 0 });
    this.inner.flush(this.wrap(done));
  }
}

const OP_OF: Record<number, IoCall['op'] | undefined> = {
  [P.CMD_READ]: 'read',
  [P.CMD_WRITE]: 'write',
  [P.CMD_WRITE_ZEROES]: 'writeZeroes',
  [P.CMD_TRIM]: 'trim',
  [P.CMD_FLUSH]: 'flush',
};

function callKey(c: IoCall): string {
  return `${c.op}:${c.offset}:${c.length}:${c.digest ?? ''}`;
}

// ---------------------------------------------------------------------------------------------
// A live server over a temp file.

interface Rig {
  dir: string;
  file: string;
  fd: number;
  spy: SpyDevice;
  server: NbdServer;
  port: number;
  /** What the file must hold outside ranges hostile requests were allowed to write. */
  model: Buffer;
}

async function startRig(readOnly = false): Promise<Rig> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'volrep-hostile-'));
  const file = path.join(dir, 'volume.img');
  fs.writeFileSync(file, Buffer.alloc(0));
  fs.truncateSync(file, SIZE);
  const fd = fs.openSync(file, readOnly ? 'r' : 'r+');
  const spy = new SpyDevice(new FileDevice(fd, SIZE, readOnly));
  const server = new NbdServer(spy, { exportName: EXPORT_NAME, logger });
  const { port } = await server.listen('127.0.0.1', 0);
  return { dir, file, fd, spy, server, port, model: Buffer.alloc(SIZE) };
}

async function stopRig(rig: Rig | undefined): Promise<void> {
  if (!rig) return;
  await Promise.race([rig.server.close(), sleep(3000)]);
  fs.closeSync(rig.fd);
  fs.rmSync(rig.dir, { recursive: true, force: true });
}

async function waitFor(what: string, cond: () => boolean, ms = 3000): Promise<void> {
  const until = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

/** Waits until the server has no connections and no I/O in flight. */
async function quiesce(rig: Rig): Promise<void> {
  await waitFor('server connections to close', () => rig.server.connectionCount === 0);
  await waitFor('device I/O to finish', () => rig.spy.inFlight === 0);
}

/** A well-behaved client writes, reads back, and checks a range it did not write against the model. */
async function wellBehaved(rig: Rig, offset: number, length: number): Promise<void> {
  const client = await NbdClient.connect('127.0.0.1', rig.port, EXPORT_NAME);
  try {
    assert.equal(client.size, SIZE);
    const data = randomBytes(length);
    await client.write(offset, data, true);
    assert.deepEqual(await client.read(offset, length), data);
    data.copy(rig.model, offset);
    const other = (offset + length + 12345) % (SIZE - 8192);
    assert.deepEqual(await client.read(other, 8192), rig.model.subarray(other, other + 8192));
  } finally {
    await client.close();
  }
}

/**
 * Checks the file: outside `allowed` ranges it must equal the model byte for byte; inside, the
 * model adopts whatever accepted hostile requests left there.
 */
function checkFile(rig: Rig, allowed: { offset: number; length: number }[]): void {
  const disk = fs.readFileSync(rig.file);
  assert.equal(disk.length, SIZE, 'volume file changed size');
  const mask = new Uint8Array(SIZE);
  for (const r of allowed) mask.fill(1, r.offset, r.offset + r.length);
  for (let i = 0; i < SIZE; i++) {
    if (mask[i]) rig.model[i] = disk[i];
    else if (disk[i] !== rig.model[i]) {
      assert.fail(
        `byte ${i} of the volume is 0x${disk[i].toString(16)}, expected 0x${rig.model[i].toString(16)}`,
      );
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Raw sockets

interface RawConn {
  socket: net.Socket;
  received: () => Buffer;
  closed: Promise<void>;
  isClosed: () => boolean;
  /** Resolves with the first `n` received bytes once that many have arrived. */
  waitBytes(n: number, ms?: number): Promise<Buffer>;
}

async function rawConnect(port: number, allowHalfOpen = true): Promise<RawConn> {
  const socket = net.connect({ host: '127.0.0.1', port, allowHalfOpen, noDelay: true });
  await new Promise<void>((resolve, reject) => {
    socket.once('connect', resolve);
    socket.once('error', reject);
  });
  const chunks: Buffer[] = [];
  let total = 0;
  let closed = false;
  socket.on('error', () => {});
  socket.on('data', (c: Buffer) => {
    chunks.push(c);
    total += c.length;
  });
  const closedP = new Promise<void>((resolve) =>
    socket.once('close', () => {
      closed = true;
      resolve();
    }),
  );
  return {
    socket,
    received: () => Buffer.concat(chunks),
    closed: closedP,
    isClosed: () => closed,
    async waitBytes(n: number, ms = 3000) {
      await waitFor(`${n} bytes from the server (have ${total})`, () => total >= n, ms);
      return Buffer.concat(chunks).subarray(0, n);
    },
  };
}

function negotiation(opts: { sr?: boolean; meta?: boolean; exportName?: boolean } = {}): Buffer {
  const parts = [clientFlags(P.CLIENT_FLAG_FIXED_NEWSTYLE | P.CLIENT_FLAG_NO_ZEROES)];
  if (opts.sr) parts.push(option(P.OPT_STRUCTURED_REPLY));
  if (opts.sr && opts.meta) parts.push(option(P.OPT_SET_META_CONTEXT, metaData('', [P.BASE_ALLOCATION])));
  parts.push(opts.exportName ? option(P.OPT_EXPORT_NAME) : option(P.OPT_GO, infoData(EXPORT_NAME, [])));
  return Buffer.concat(parts);
}

/** What the server answers to a negotiation (computed with the sans-I/O machine). */
function handshakeReply(bytes: Buffer): {
  output: Buffer;
  limits?: Limits;
  consumed: number;
} {
  const hs = new Handshake({ name: EXPORT_NAME, description: 'volrep volume', size: SIZE, flags: 0 });
  const queue = new ChunkQueue();
  queue.push(bytes);
  const r = hs.receive(queue);
  const output = Buffer.concat([hs.greeting(), ...r.output]);
  const consumed = bytes.length - queue.length;
  if (r.outcome?.kind !== 'transmission') return { output, consumed };
  const s = r.outcome.session;
  return {
    output,
    consumed,
    limits: {
      size: SIZE,
      readOnly: false,
      structuredReplies: s.structuredReplies,
      baseAllocationId: s.baseAllocationId,
    },
  };
}

/** Requests the server may act on for this stream: accepted ones up to a DISC or a fatal frame. */
function acceptedRequests(bytes: Buffer): {
  refs: RefRequest[];
  limits?: Limits;
  fatal: boolean;
  disc: boolean;
} {
  const hs = handshakeReply(bytes);
  if (!hs.limits) return { refs: [], fatal: false, disc: false };
  const ref = refParse(bytes.subarray(hs.consumed), hs.limits);
  const refs: RefRequest[] = [];
  for (const r of ref.requests) {
    if (r.command === P.CMD_DISC && r.error === 0)
      return { refs, limits: hs.limits, fatal: false, disc: true };
    refs.push(r);
  }
  return { refs, limits: hs.limits, fatal: ref.fatal, disc: false };
}

/** Parses the transmission-phase replies; returns handle → errno (0 = success) for each. */
function parseReplies(buf: Buffer, structured: boolean, readLength: (handle: string) => number | undefined) {
  const replies: { handle: string; error: number }[] = [];
  let at = 0;
  while (at < buf.length) {
    if (!structured) {
      assert.ok(buf.length - at >= 16, 'truncated simple reply');
      assert.equal(buf.readUInt32BE(at), P.SIMPLE_REPLY_MAGIC, 'bad simple reply magic');
      const error = buf.readUInt32BE(at + 4);
      const handle = buf.subarray(at + 8, at + 16).toString('hex');
      at += 16;
      if (error === 0) at += readLength(handle) ?? 0;
      assert.ok(at <= buf.length, 'truncated READ data');
      replies.push({ handle, error });
      continue;
    }
    assert.ok(buf.length - at >= 20, 'truncated structured reply');
    assert.equal(buf.readUInt32BE(at), P.STRUCTURED_REPLY_MAGIC, 'bad structured reply magic');
    const flags = buf.readUInt16BE(at + 4);
    const type = buf.readUInt16BE(at + 6);
    const handle = buf.subarray(at + 8, at + 16).toString('hex');
    const length = buf.readUInt32BE(at + 16);
    assert.ok(at + 20 + length <= buf.length, 'truncated structured reply payload');
    const payload = buf.subarray(at + 20, at + 20 + length);
    at += 20 + length;
    assert.ok(flags & P.REPLY_FLAG_DONE, 'volrep sends single-chunk replies');
    let error = 0;
    if (type === P.REPLY_TYPE_ERROR) error = payload.readUInt32BE(0);
    else if (type === P.REPLY_TYPE_OFFSET_DATA) assert.equal(length - 8, readLength(handle));
    else assert.ok(type === P.REPLY_TYPE_NONE || type === P.REPLY_TYPE_BLOCK_STATUS, `reply type ${type}`);
    replies.push({ handle, error });
  }
  return replies;
}

// ---------------------------------------------------------------------------------------------
// Hostile streams

type Ending = 'end' | 'hold' | 'reset' | 'destroy';

interface HostileStream {
  bytes: Buffer;
  cuts: number[];
  ending: Ending;
  /** For 'reset': how many bytes go out before the reset. */
  resetAt: number;
}

interface Fields {
  flags: number;
  command: number;
  handle: bigint;
  offset: bigint;
  length: number;
}

const arbRequest: fc.Arbitrary<Fields> = fc.record({
  flags: fc.oneof(
    { weight: 4, arbitrary: fc.constantFrom(0, P.CMD_FLAG_FUA) },
    { weight: 1, arbitrary: fc.nat({ max: 0xffff }) },
  ),
  command: fc.oneof(
    { weight: 8, arbitrary: fc.constantFrom(0, 1, 1, 1, 3, 4, 6, 7) },
    { weight: 1, arbitrary: fc.constantFrom(2, 5, 9, 0xffff) },
  ),
  handle: fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
  offset: fc.oneof(
    { weight: 4, arbitrary: fc.integer({ min: 0, max: SIZE - 4096 }).map(BigInt) },
    {
      weight: 1,
      arbitrary: fc.constantFrom(
        BigInt(SIZE - 512),
        BigInt(SIZE),
        BigInt(SIZE + 1),
        2n ** 63n,
        2n ** 64n - 1n,
        2n ** 64n - 512n,
      ),
    },
  ),
  length: fc.oneof(
    { weight: 4, arbitrary: fc.integer({ min: 0, max: 4096 }) },
    { weight: 1, arbitrary: fc.constantFrom(70_000, P.PAYLOAD_BYTES_MAX + 1, 2 ** 32 - 1) },
  ),
});

function encodeRequests(reqs: Fields[], fill: number): Buffer {
  const parts: Buffer[] = [];
  for (const r of reqs) {
    parts.push(requestHeader(r));
    if (r.command === P.CMD_WRITE) {
      // Payloads stay small; a larger WRITE is left hanging (its payload never all arrives).
      if (r.length > 70_000) break;
      parts.push(Buffer.alloc(r.length, fill));
    }
  }
  return Buffer.concat(parts);
}

const arbValidPrefix = fc
  .record({ sr: fc.boolean(), meta: fc.boolean(), exportName: fc.boolean() })
  .map((o) => negotiation(o));

const arbStreamBytes: fc.Arbitrary<Buffer> = fc.oneof(
  // Pure garbage.
  { weight: 1, arbitrary: fc.uint8Array({ maxLength: 200 }).map((b) => Buffer.from(b)) },
  // Garbage before a valid handshake.
  {
    weight: 1,
    arbitrary: fc
      .tuple(fc.uint8Array({ minLength: 1, maxLength: 40 }), arbValidPrefix)
      .map(([g, h]) => Buffer.concat([Buffer.from(g), h])),
  },
  // A valid handshake, then requests (valid and not), then maybe garbage.
  {
    weight: 4,
    arbitrary: fc
      .tuple(
        arbValidPrefix,
        fc.array(arbRequest, { maxLength: 8 }),
        fc.integer({ min: 1, max: 255 }),
        fc.option(fc.uint8Array({ minLength: 1, maxLength: 40 })),
      )
      .map(([h, reqs, fill, g]) => Buffer.concat([h, encodeRequests(reqs, fill), Buffer.from(g ?? [])])),
  },
  // The same, mutated.
  {
    weight: 3,
    arbitrary: fc
      .tuple(
        arbValidPrefix,
        fc.array(arbRequest, { maxLength: 6 }),
        fc.integer({ min: 1, max: 255 }),
        fc.array(arbMutation, { minLength: 1, maxLength: 3 }),
      )
      .map(([h, reqs, fill, m]) => mutate(Buffer.concat([h, encodeRequests(reqs, fill)]), m)),
  },
);

const arbStream: fc.Arbitrary<HostileStream> = fc.record({
  bytes: arbStreamBytes,
  cuts: arbCuts,
  ending: fc.constantFrom<Ending>('end', 'hold', 'hold', 'reset', 'destroy'),
  resetAt: fc.nat(),
});

/** Runs one hostile connection, bounded in time; returns what the server sent. */
async function runHostile(
  port: number,
  s: HostileStream,
): Promise<{ received: Buffer; closedByServer: boolean }> {
  const conn = await rawConnect(port);
  const chunks = splitAt(s.bytes, s.cuts);
  const limit = s.ending === 'reset' ? s.resetAt % (s.bytes.length + 1) : s.bytes.length;
  let sent = 0;
  for (const chunk of chunks) {
    if (conn.isClosed()) break;
    const piece = chunk.subarray(0, Math.max(0, limit - sent));
    if (piece.length > 0) conn.socket.write(piece);
    sent += piece.length;
    if (sent >= limit) break;
    await new Promise((r) => setImmediate(r));
  }
  let closedByServer = false;
  switch (s.ending) {
    case 'reset':
      await sleep(5);
      conn.socket.resetAndDestroy();
      break;
    case 'destroy':
      await sleep(20);
      conn.socket.destroy();
      break;
    case 'end':
      conn.socket.end();
      closedByServer = await Promise.race([conn.closed.then(() => true), sleep(300).then(() => false)]);
      conn.socket.destroy();
      break;
    case 'hold':
      closedByServer = await Promise.race([conn.closed.then(() => true), sleep(150).then(() => false)]);
      conn.socket.destroy();
      break;
  }
  await conn.closed;
  return { received: conn.received(), closedByServer };
}

/** Checks the server's answers on a connection that was neither reset nor half-closed. */
function checkHeldReplies(s: HostileStream, received: Buffer): void {
  const hs = handshakeReply(s.bytes);
  const { refs, limits, fatal } = acceptedRequests(s.bytes);
  // A bad request magic drops the connection at once, and with it any replies queued in the same
  // turn (even the negotiation's): nothing to check beyond the greeting.
  assert.deepEqual(received.subarray(0, 18), hs.output.subarray(0, 18), 'bad greeting');
  if (fatal) return;
  // Transmission flags differ between the reference machine and the server; compare lengths only.
  assert.ok(received.length >= hs.output.length, 'negotiation replies missing');
  if (!limits) {
    assert.equal(received.length, hs.output.length, 'replies to a negotiation that did not finish');
    return;
  }
  const byHandle = new Map<string, RefRequest>();
  for (const r of refs) byHandle.set(r.handle.toString('hex'), r);
  if (byHandle.size !== refs.length) return; // duplicate handles: replies cannot be attributed
  const replies = parseReplies(received.subarray(hs.output.length), limits.structuredReplies, (h) => {
    const r = byHandle.get(h);
    return r?.command === P.CMD_READ ? r.length : 0;
  });
  // A WRITE whose payload never completed is not a request yet: no reply.
  assert.deepEqual(
    replies.map((r) => r.handle).sort(),
    refs.map((r) => r.handle.toString('hex')).sort(),
    'each complete request gets exactly one reply',
  );
  for (const reply of replies) {
    const ref = byHandle.get(reply.handle)!;
    assert.equal(reply.error, ref.error, `errno for command ${ref.command} at ${ref.offset}+${ref.length}`);
  }
}

// ---------------------------------------------------------------------------------------------

describe('NbdServer under hostile clients', () => {
  let rig: Rig | undefined;
  before(async () => {
    rig = await startRig();
  });
  after(async () => {
    await stopRig(rig);
  });

  it('survives random and mutated streams; no I/O outside accepted requests', async () => {
    const r = rig!;
    let run = 0;
    await fc.assert(
      fc.asyncProperty(fc.array(arbStream, { minLength: 1, maxLength: 6 }), async (streams) => {
        run++;
        r.spy.calls = [];
        const results = await Promise.all(streams.map((s) => runHostile(r.port, s)));
        await quiesce(r);

        // Every I/O the server issued is an accepted request of one of the streams.
        const allowedKeys = new Map<string, number>();
        const allowedRanges: { offset: number; length: number }[] = [];
        for (const s of streams) {
          for (const ref of acceptedRequests(s.bytes).refs) {
            if (ref.error !== 0) continue;
            const op = OP_OF[ref.command];
            if (op === undefined) continue;
            const isFlush = op === 'flush';
            const key = callKey({
              op,
              offset: isFlush ? 0 : Number(ref.offset),
              length: isFlush ? 0 : ref.length,
              digest: ref.payload ? digest([ref.payload]) : undefined,
            });
            allowedKeys.set(key, (allowedKeys.get(key) ?? 0) + 1);
            if (isWriteCommand(ref.command))
              allowedRanges.push({ offset: Number(ref.offset), length: ref.length });
          }
        }
        for (const call of r.spy.calls) {
          assert.ok(
            call.offset >= 0 && call.offset + call.length <= SIZE,
            `I/O beyond the volume: ${callKey(call)}`,
          );
          const key = callKey(call);
          const left = allowedKeys.get(key) ?? 0;
          assert.ok(left > 0, `I/O no accepted request asked for: ${key}`);
          allowedKeys.set(key, left - 1);
        }
        checkFile(r, allowedRanges);

        for (let i = 0; i < streams.length; i++) {
          if (streams[i].ending === 'hold' && results[i].closedByServer === false) {
            checkHeldReplies(streams[i], results[i].received);
          } else if (results[i].received.length > 0) {
            assert.equal(results[i].received.readUInt32BE(0), 0x4e42444d, 'greeting');
          }
        }

        // The server still serves a well-behaved client correctly.
        r.spy.calls = [];
        const length = run % 3 === 0 ? 100_000 : 4096 + (run % 7) * 512;
        await wellBehaved(r, (run * 65_536 + 512) % (SIZE - length), length);
        await quiesce(r);
        checkFile(r, []);
      }),
      fcParams(30),
    );
  });

  it('answers a bad request in the transmission phase with an error and keeps the connection', async () => {
    const r = rig!;
    for (const sr of [false, true]) {
      const conn = await rawConnect(r.port);
      const hello = negotiation({ sr });
      const hs = handshakeReply(hello);
      conn.socket.write(hello);
      await conn.waitBytes(hs.output.length);
      const send = (
        f: Partial<{ flags: number; command: number; offset: bigint; length: number }>,
        h: bigint,
      ) =>
        conn.socket.write(
          requestHeader({ flags: 0, command: P.CMD_READ, offset: 0n, length: 512, ...f, handle: h }),
        );
      const replyBytes = sr ? 20 + 6 : 16;
      const expectError = async (h: bigint, errno: number, at: number) => {
        const buf = (await conn.waitBytes(at + replyBytes)).subarray(at);
        assert.equal(buf.readBigUInt64BE(8), h);
        if (sr) {
          assert.equal(buf.readUInt16BE(6), P.REPLY_TYPE_ERROR);
          assert.equal(buf.readUInt32BE(20), errno);
          const msgLength = buf.readUInt16BE(24);
          await conn.waitBytes(at + replyBytes + msgLength);
          return at + replyBytes + msgLength;
        }
        assert.equal(buf.readUInt32BE(4), errno);
        return at + replyBytes;
      };
      let at = hs.output.length;
      send({ offset: BigInt(SIZE) }, 1n);
      at = await expectError(1n, P.EINVAL, at);
      send({ command: 0x55 }, 2n);
      at = await expectError(2n, P.EINVAL, at);
      send({ flags: 0x8000 }, 3n);
      at = await expectError(3n, P.EINVAL, at);
      send({ command: P.CMD_WRITE, offset: BigInt(SIZE - 256), length: 512 }, 4n);
      conn.socket.write(Buffer.alloc(512, 0xee));
      at = await expectError(4n, P.ENOSPC, at);
      send({ command: P.CMD_WRITE_ZEROES, offset: 2n ** 64n - 512n }, 5n);
      at = await expectError(5n, P.ENOSPC, at);
      send({ command: P.CMD_READ, length: 0 }, 6n);
      at = await expectError(6n, P.EINVAL, at);
      // The connection still works: a valid READ of the start of the volume.
      send({ offset: 0n, length: 512 }, 7n);
      const ok = (await conn.waitBytes(at + (sr ? 28 : 16) + 512)).subarray(at);
      assert.equal(ok.readBigUInt64BE(8), 7n);
      if (sr) assert.equal(ok.readUInt16BE(6), P.REPLY_TYPE_OFFSET_DATA);
      else assert.equal(ok.readUInt32BE(4), 0);
      assert.deepEqual(ok.subarray(sr ? 28 : 16), r.model.subarray(0, 512));
      conn.socket.destroy();
      await conn.closed;
    }
    await quiesce(r);
    checkFile(r, []);
  });

  it('drops an oversize WRITE payload, answers EINVAL, and the connection stays usable', async () => {
    const r = rig!;
    r.spy.calls = [];
    const conn = await rawConnect(r.port);
    const hello = negotiation();
    const hs = handshakeReply(hello);
    conn.socket.write(hello);
    await conn.waitBytes(hs.output.length);
    const length = P.PAYLOAD_BYTES_MAX + 4096;
    conn.socket.write(requestHeader({ flags: 0, command: P.CMD_WRITE, handle: 77n, offset: 0n, length }));
    const chunk = Buffer.alloc(MiB, 0x5a);
    for (let sent = 0; sent < length; sent += chunk.length) {
      const n = Math.min(chunk.length, length - sent);
      if (!conn.socket.write(chunk.subarray(0, n)))
        await new Promise((res) => conn.socket.once('drain', res));
    }
    conn.socket.write(
      requestHeader({ flags: 0, command: P.CMD_READ, handle: 78n, offset: 0n, length: 4096 }),
    );
    const at = hs.output.length;
    const replies = await conn.waitBytes(at + 16 + 16 + 4096, 10_000);
    assert.equal(replies.readBigUInt64BE(at + 8), 77n);
    assert.equal(replies.readUInt32BE(at + 4), P.EINVAL);
    assert.equal(replies.readBigUInt64BE(at + 16 + 8), 78n);
    assert.equal(replies.readUInt32BE(at + 16 + 4), 0);
    assert.deepEqual(replies.subarray(at + 32, at + 32 + 4096), r.model.subarray(0, 4096));
    assert.deepEqual(
      r.spy.calls.map((c) => c.op),
      ['read'],
    );
    conn.socket.destroy();
    await conn.closed;
    await quiesce(r);
    checkFile(r, []);
  });

  it('survives a reset in the middle of a WRITE payload, with nothing written', async () => {
    const r = rig!;
    r.spy.calls = [];
    for (const length of [4096, 1024 * 1024]) {
      const conn = await rawConnect(r.port);
      const hello = negotiation();
      conn.socket.write(hello);
      await conn.waitBytes(handshakeReply(hello).output.length);
      conn.socket.write(requestHeader({ flags: 0, command: P.CMD_WRITE, handle: 1n, offset: 8192n, length }));
      conn.socket.write(Buffer.alloc(length / 2, 0x33));
      await sleep(20);
      conn.socket.resetAndDestroy();
      await conn.closed;
    }
    await quiesce(r);
    assert.deepEqual(r.spy.calls, []);
    checkFile(r, []);
    await wellBehaved(r, 8192, 4096);
  });

  it('answers requests sent before a half-close, then closes', async () => {
    const r = rig!;
    const conn = await rawConnect(r.port);
    const hello = negotiation();
    const at = handshakeReply(hello).output.length;
    conn.socket.write(hello);
    conn.socket.write(
      requestHeader({ flags: 0, command: P.CMD_READ, handle: 5n, offset: 4096n, length: 1024 }),
    );
    conn.socket.end();
    await Promise.race([conn.closed, sleep(3000)]);
    assert.ok(conn.isClosed(), 'server did not close after the client half-closed');
    const got = conn.received();
    assert.equal(got.length, at + 16 + 1024);
    assert.equal(got.readUInt32BE(at + 4), 0);
    assert.deepEqual(got.subarray(at + 16), r.model.subarray(4096, 4096 + 1024));
    await quiesce(r);
  });

  it('closes a connection whose negotiation it refused, even if the client keeps its side open', async () => {
    const r = rig!;
    const conn = await rawConnect(r.port, true);
    await conn.waitBytes(18);
    const bad = option(P.OPT_LIST);
    bad[0] ^= 0xff; // bad IHAVEOPT magic: the server refuses the negotiation
    conn.socket.write(Buffer.concat([clientFlags(1), bad]));
    // A hostile client ignores the refusal and keeps sending; the server must not keep buffering it.
    const junk = Buffer.alloc(256 * 1024, 0x41);
    for (let i = 0; i < 16 && !conn.isClosed(); i++) {
      conn.socket.write(junk);
      await sleep(10);
    }
    await waitFor(
      'the server to drop the refused connection',
      () => r.server.connectionCount === 0,
      2000,
    ).catch(() => {});
    const stillOpen = r.server.connectionCount;
    conn.socket.destroy();
    await conn.closed;
    await quiesce(r);
    assert.equal(stillOpen, 0, 'refused connection still open (and buffering what the client sends)');
  });
});

describe('NbdServer on a read-only export', () => {
  let rig: Rig | undefined;
  before(async () => {
    rig = await startRig(true);
  });
  after(async () => {
    await stopRig(rig);
  });

  it('refuses writes with EPERM and keeps serving reads on the same connection', async () => {
    const r = rig!;
    const conn = await rawConnect(r.port);
    const hello = negotiation();
    const hs = handshakeReply(hello);
    conn.socket.write(hello);
    const negotiated = await conn.waitBytes(hs.output.length);
    // The INFO_EXPORT reply carries READ_ONLY.
    const flags = negotiated.readUInt16BE(18 + 20 + 10);
    assert.ok(flags & P.TFLAG_READ_ONLY);
    let at = hs.output.length;
    const cmds: [number, number][] = [
      [P.CMD_WRITE, 512],
      [P.CMD_TRIM, 0],
      [P.CMD_WRITE_ZEROES, 0],
    ];
    let h = 1n;
    for (const [command, payload] of cmds) {
      conn.socket.write(requestHeader({ flags: 0, command, handle: h, offset: 0n, length: 512 }));
      if (payload) conn.socket.write(Buffer.alloc(payload, 0x77));
      const reply = (await conn.waitBytes(at + 16)).subarray(at);
      assert.equal(reply.readBigUInt64BE(8), h);
      assert.equal(reply.readUInt32BE(4), P.EPERM);
      at += 16;
      h++;
    }
    conn.socket.write(requestHeader({ flags: 0, command: P.CMD_READ, handle: h, offset: 0n, length: 512 }));
    const ok = (await conn.waitBytes(at + 16 + 512)).subarray(at);
    assert.equal(ok.readUInt32BE(4), 0);
    assert.deepEqual(ok.subarray(16), Buffer.alloc(512));
    conn.socket.destroy();
    await conn.closed;
    await quiesce(r);
    assert.deepEqual(
      r.spy.calls.map((c) => c.op),
      ['read'],
    );
    checkFile(r, []);
  });
});

describe('NbdServer negotiation timeout', () => {
  let rig: Rig | undefined;
  before(async () => {
    rig = await startRig();
  });
  after(async () => {
    mock.timers.reset();
    await stopRig(rig);
  });

  /** Lets I/O callbacks run without relying on (mocked) timers. */
  async function spin(cond: () => boolean, turns = 2000): Promise<boolean> {
    for (let i = 0; i < turns && !cond(); i++) await new Promise((r) => setImmediate(r));
    return cond();
  }

  // HANDSHAKE_TIMEOUT_MS is a module constant with no way to lower it for a test, so the timer is
  // driven with node:test's mocked setTimeout instead of waiting 30 s.
  it(`disconnects a client that does not finish negotiating within ${HANDSHAKE_TIMEOUT_MS} ms`, async () => {
    const r = rig!;
    const prefixes = [
      Buffer.alloc(0), // sends nothing at all
      clientFlags(1), // flags only
      Buffer.concat([clientFlags(1), option(P.OPT_LIST).subarray(0, 10)]), // half an option header
      Buffer.concat([clientFlags(1), option(P.OPT_INFO, infoData(EXPORT_NAME, [])).subarray(0, 20)]), // partial data
    ];
    for (const prefix of prefixes) {
      mock.timers.enable({ apis: ['setTimeout'] });
      try {
        const conn = await rawConnect(r.port, false);
        await spin(() => conn.received().length >= 18);
        assert.equal(conn.received().length, 18, 'greeting');
        if (prefix.length > 0) conn.socket.write(prefix);
        assert.ok(await spin(() => r.server.connectionCount === 1));
        mock.timers.tick(HANDSHAKE_TIMEOUT_MS - 1);
        assert.equal(await spin(() => conn.isClosed(), 200), false, 'disconnected before the timeout');
        mock.timers.tick(1);
        assert.ok(await spin(() => conn.isClosed()), 'not disconnected after the timeout');
        assert.ok(await spin(() => r.server.connectionCount === 0));
      } finally {
        mock.timers.reset();
      }
    }
  });

  it('does not disconnect a client that finished negotiating', async () => {
    const r = rig!;
    mock.timers.enable({ apis: ['setTimeout'] });
    try {
      const conn = await rawConnect(r.port);
      const hello = negotiation();
      const at = handshakeReply(hello).output.length;
      conn.socket.write(hello);
      assert.ok(await spin(() => conn.received().length >= at));
      mock.timers.tick(HANDSHAKE_TIMEOUT_MS * 3);
      assert.equal(await spin(() => conn.isClosed(), 200), false);
      conn.socket.write(requestHeader({ flags: 0, command: P.CMD_READ, handle: 1n, offset: 0n, length: 16 }));
      assert.ok(await spin(() => conn.received().length >= at + 32));
      assert.equal(conn.received().readUInt32BE(at + 4), 0);
      conn.socket.destroy();
      await conn.closed;
    } finally {
      mock.timers.reset();
    }
  });
});

describe('NbdServer shutdown with a hostile client', () => {
  it('close() completes even when a client never closes its side', async () => {
    const rig = await startRig();
    let conn: RawConn | undefined;
    try {
      conn = await rawConnect(rig.port, true);
      const hello = negotiation();
      conn.socket.write(hello);
      await conn.waitBytes(handshakeReply(hello).output.length);
      const closed = await Promise.race([rig.server.close().then(() => true), sleep(3000).then(() => false)]);
      assert.ok(closed, 'NbdServer.close() still waiting 3 s later for a client that keeps its side open');
    } finally {
      conn?.socket.destroy();
      await stopRig(rig);
    }
  });
});
