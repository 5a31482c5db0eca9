/**
 * Hostile input for the transmission-phase parser: random, semi-random and mutated request
 * streams, split at arbitrary chunk boundaries, against an independent reference model of framing
 * and validation (wire.ts). What matters most: no event of kind 'request' (the ones the server
 * turns into I/O) is ever out of range, oversize, unknown, badly flagged or a write on a
 * read-only export.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { ChunkQueue } from '../../src/io/chunk-queue.js';
import * as P from '../../src/nbd/protocol.js';
import {
  type ExportLimits,
  type ParseEvent,
  RequestParser,
  validateRequest,
} from '../../src/nbd/requests.js';
import {
  arbCuts,
  arbMutation,
  bytewise,
  fcParams,
  isWriteCommand,
  type Limits,
  mutate,
  REF_ALLOWED_FLAGS,
  refError,
  refParse,
  requestHeader,
  splitAt,
} from './wire.js';

const MiB = 1024 * 1024;

interface Outcome {
  /** Events in a comparable form. */
  events: string[];
  fatal: boolean;
  remaining: number;
}

function describeEvent(e: ParseEvent): string {
  if (e.kind === 'fatal') return `fatal ${e.reason}`;
  const r = e.request;
  const payload = Buffer.concat(r.payload).toString('hex');
  const head = `${e.kind} cmd=${r.command} flags=${r.flags} handle=${r.handle.toString('hex')} len=${r.length}`;
  if (e.kind === 'rejected') return `${head} error=${e.error}`;
  // DISC and FLUSH take no range: their offset field is meaningless (and may be clamped).
  if (r.command === P.CMD_DISC || r.command === P.CMD_FLUSH) return head;
  return `${head} off=${r.offset} payload=${payload}`;
}

/** Checks the invariants every event must satisfy, whatever the input. */
function checkEvent(e: ParseEvent, limits: Limits): void {
  if (e.kind === 'fatal') return;
  const r = e.request;
  assert.equal(r.handle.length, 8);
  if (e.kind === 'rejected') {
    assert.ok(
      [P.EINVAL, P.ENOSPC, P.EPERM].includes(e.error),
      `rejected with unexpected errno ${e.error}: ${e.message}`,
    );
    assert.ok(e.message.length > 0);
    return;
  }
  // A request the server will execute.
  const allowed = REF_ALLOWED_FLAGS[r.command];
  assert.ok(allowed !== undefined, `unknown command ${r.command} passed to I/O`);
  assert.equal(
    r.flags & ~allowed,
    0,
    `flags 0x${r.flags.toString(16)} passed to I/O for command ${r.command}`,
  );
  assert.ok(!(limits.readOnly && isWriteCommand(r.command)), 'write-kind command on a read-only export');
  assert.ok(Number.isSafeInteger(r.offset) && r.offset >= 0);
  if (r.command === P.CMD_DISC || r.command === P.CMD_FLUSH) return;
  assert.ok(r.length > 0, 'zero-length I/O');
  assert.ok(r.offset + r.length <= limits.size, `I/O at ${r.offset}+${r.length} beyond ${limits.size}`);
  if (r.command === P.CMD_READ || r.command === P.CMD_WRITE) assert.ok(r.length <= P.PAYLOAD_BYTES_MAX);
  if (r.command === P.CMD_WRITE) {
    assert.equal(
      r.payload.reduce((n, b) => n + b.length, 0),
      r.length,
      'WRITE payload length differs from the header',
    );
  } else {
    assert.equal(r.payload.length, 0);
  }
  if (r.command === P.CMD_BLOCK_STATUS) assert.ok(limits.structuredReplies && limits.baseAllocationId !== 0);
}

/** Feeds the chunks like a socket; pulls events until the parser needs more or reports 'fatal'. */
function drive(chunks: Buffer[], limits: Limits): Outcome {
  const parser = new RequestParser(limits as ExportLimits);
  const queue = new ChunkQueue();
  const events: string[] = [];
  let total = 0;
  for (const c of chunks) total += c.length;
  // Every event consumes at least a 28-byte header: anything more is a loop.
  const bound = Math.floor(total / P.REQUEST_HEADER_BYTES) + chunks.length + 1;
  let calls = 0;
  for (const chunk of chunks) {
    queue.push(chunk);
    for (;;) {
      assert.ok(++calls <= bound, 'parser keeps producing events without consuming input');
      const e = parser.next(queue);
      if (e === undefined) break;
      checkEvent(e, limits);
      events.push(describeEvent(e));
      if (e.kind === 'fatal') {
        let left = queue.length;
        for (const c of chunks.slice(chunks.indexOf(chunk) + 1)) left += c.length;
        return { events, fatal: true, remaining: left };
      }
    }
  }
  return { events, fatal: false, remaining: queue.length };
}

/** What the reference model says the parser must produce. */
function expected(input: Buffer, limits: Limits): Outcome {
  const ref = refParse(input, limits);
  const events = ref.requests.map((r) => {
    const head = `${r.error === 0 ? 'request' : 'rejected'} cmd=${r.command} flags=${r.flags} handle=${r.handle.toString('hex')} len=${r.length}`;
    if (r.error !== 0) return `${head} error=${r.error}`;
    if (r.command === P.CMD_DISC || r.command === P.CMD_FLUSH) return head;
    return `${head} off=${r.offset} payload=${r.payload?.toString('hex') ?? ''}`;
  });
  if (ref.fatal) events.push('fatal bad request magic');
  return { events, fatal: ref.fatal, remaining: ref.remaining };
}

const arbLimits: fc.Arbitrary<Limits> = fc.record({
  size: fc.constantFrom(1, 512, MiB, 4 * MiB + 512, 2 ** 32 + 7, 2 ** 40, 2 ** 50),
  readOnly: fc.boolean(),
  structuredReplies: fc.boolean(),
  baseAllocationId: fc.constantFrom(0, 1),
});

/** Offsets around the edges of the export and of the number representations. */
function arbOffset(size: number): fc.Arbitrary<bigint> {
  const s = BigInt(size);
  return fc.oneof(
    fc.constantFrom(
      0n,
      s - 1n,
      s,
      s + 1n,
      s - 512n < 0n ? 0n : s - 512n,
      2n ** 32n - 1n,
      2n ** 32n,
      2n ** 52n,
      2n ** 53n + 1n,
      2n ** 63n,
      2n ** 64n - 1n,
      2n ** 64n - 512n,
    ),
    fc.bigInt({ min: 0n, max: s }),
    fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
  );
}

const arbLength = fc.oneof(
  fc.constantFrom(0, 1, 511, 512, 4096, P.PAYLOAD_BYTES_MAX, P.PAYLOAD_BYTES_MAX + 1, 2 ** 32 - 1, 2 ** 31),
  fc.integer({ min: 1, max: 2048 }),
);

const arbCommand = fc.oneof(
  { weight: 6, arbitrary: fc.constantFrom(0, 1, 2, 3, 4, 6, 7) },
  { weight: 1, arbitrary: fc.constantFrom(5, 8, 9, 0x100, 0xffff) },
);

const arbFlags = fc.oneof(
  { weight: 3, arbitrary: fc.constant(0) },
  { weight: 3, arbitrary: fc.constantFrom(1, 2, 4, 8, 3, 5, 9) },
  { weight: 1, arbitrary: fc.nat({ max: 0xffff }) },
);

interface Fields {
  flags: number;
  command: number;
  handle: bigint;
  offset: bigint;
  length: number;
}

/** Encodes requests; WRITE payloads are included when small enough, else the stream ends there. */
function encode(reqs: Fields[], fill: number): Buffer {
  const parts: Buffer[] = [];
  for (const r of reqs) {
    parts.push(requestHeader(r));
    if (r.command === P.CMD_WRITE) {
      if (r.length > 4096) break;
      parts.push(Buffer.alloc(r.length, (fill + Number(r.handle)) & 0xff));
    }
  }
  return Buffer.concat(parts);
}

function arbFields(size: number): fc.Arbitrary<Fields> {
  return fc.record({
    flags: arbFlags,
    command: arbCommand,
    handle: fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
    offset: arbOffset(size),
    length: arbLength,
  });
}

/** Requests a well-behaved client would send: in range, known, with allowed flags. */
function arbValidFields(limits: Limits): fc.Arbitrary<Fields> {
  const size = limits.size;
  return fc
    .record({
      command: fc.constantFrom(
        P.CMD_READ,
        P.CMD_WRITE,
        P.CMD_FLUSH,
        P.CMD_TRIM,
        P.CMD_WRITE_ZEROES,
        P.CMD_BLOCK_STATUS,
      ),
      fua: fc.boolean(),
      handle: fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
      start: fc.double({ min: 0, max: 1, noNaN: true }),
      length: fc.integer({ min: 1, max: Math.min(size, 2048) }),
    })
    .map((r) => {
      const offset = BigInt(Math.floor(r.start * (size - r.length)));
      return {
        command: r.command,
        flags: r.fua ? P.CMD_FLAG_FUA : 0,
        handle: r.handle,
        offset: r.command === P.CMD_FLUSH ? 0n : offset,
        length: r.command === P.CMD_FLUSH ? 0 : r.length,
      };
    });
}

function checkStream(input: Buffer, limits: Limits, cuts: number[]): void {
  const want = expected(input, limits);
  const whole = drive([input], limits);
  assert.deepEqual(whole, want);
  assert.deepEqual(drive(splitAt(input, cuts), limits), want, 'result depends on chunk boundaries');
  if (input.length <= 400) assert.deepEqual(drive(bytewise(input), limits), want);
}

describe('RequestParser under hostile input', () => {
  it('random byte streams: never throw; bad magic is fatal', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 200 }), arbLimits, arbCuts, (bytes, limits, cuts) => {
        checkStream(Buffer.from(bytes), limits, cuts);
      }),
      fcParams(500),
    );
  });

  it('well-framed requests with random fields get the reference verdict and errno', () => {
    fc.assert(
      fc.property(
        arbLimits.chain((limits) =>
          fc.tuple(
            fc.constant(limits),
            fc.array(arbFields(limits.size), { maxLength: 12 }),
            fc.nat({ max: 255 }),
          ),
        ),
        arbCuts,
        ([limits, reqs, fill], cuts) => checkStream(encode(reqs, fill), limits, cuts),
      ),
      fcParams(1500),
    );
  });

  it('mutated valid request sequences (flips, truncation, insertion, duplication, huge lengths)', () => {
    fc.assert(
      fc.property(
        arbLimits.chain((limits) =>
          fc.tuple(fc.constant(limits), fc.array(arbValidFields(limits), { minLength: 1, maxLength: 8 })),
        ),
        fc.nat({ max: 255 }),
        fc.array(arbMutation, { minLength: 1, maxLength: 4 }),
        arbCuts,
        ([limits, reqs], fill, mutations, cuts) =>
          checkStream(mutate(encode(reqs, fill), mutations), limits, cuts),
      ),
      fcParams(1500),
    );
  });

  it('unmutated valid sequences are all accepted, in order, with their payloads', () => {
    fc.assert(
      fc.property(
        arbLimits
          .filter((l) => !l.readOnly)
          .chain((limits) =>
            fc.tuple(fc.constant(limits), fc.array(arbValidFields(limits), { minLength: 1, maxLength: 8 })),
          ),
        arbCuts,
        ([limits, reqs], cuts) => {
          const input = encode(reqs, 1);
          const out = drive(splitAt(input, cuts), limits);
          const bsOk = limits.structuredReplies && limits.baseAllocationId !== 0;
          assert.deepEqual(
            out.events.map((e) => e.split(' ')[0]),
            reqs.map((r) => (r.command === P.CMD_BLOCK_STATUS && !bsOk ? 'rejected' : 'request')),
          );
          assert.equal(out.remaining, 0);
        },
      ),
      fcParams(300),
    );
  });
});

describe('RequestParser errnos', () => {
  const rw: Limits = { size: MiB, readOnly: false, structuredReplies: true, baseAllocationId: 1 };
  const ro: Limits = { ...rw, readOnly: true };
  const one = (limits: Limits, f: Partial<Fields>): ParseEvent | undefined => {
    const fields: Fields = { flags: 0, command: P.CMD_READ, handle: 42n, offset: 0n, length: 512, ...f };
    const parts = [requestHeader(fields)];
    if (fields.command === P.CMD_WRITE) parts.push(Buffer.alloc(fields.length));
    const queue = new ChunkQueue();
    queue.push(Buffer.concat(parts));
    return new RequestParser(limits as ExportLimits).next(queue);
  };
  const errnoOf = (e: ParseEvent | undefined) => (e?.kind === 'rejected' ? e.error : e?.kind);

  it('out-of-range writes are ENOSPC, out-of-range reads EINVAL', () => {
    for (const command of [P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES]) {
      assert.equal(errnoOf(one(rw, { command, offset: BigInt(MiB - 511) })), P.ENOSPC);
      assert.equal(errnoOf(one(rw, { command, offset: 2n ** 64n - 1n })), P.ENOSPC);
      assert.equal(errnoOf(one(rw, { command, offset: BigInt(MiB - 512) })), 'request');
    }
    for (const command of [P.CMD_READ, P.CMD_BLOCK_STATUS]) {
      assert.equal(errnoOf(one(rw, { command, offset: BigInt(MiB) })), P.EINVAL);
      // 2^64 - 1 must not wrap around into range.
      assert.equal(errnoOf(one(rw, { command, offset: 2n ** 64n - 1n, length: 1 })), P.EINVAL);
      assert.equal(errnoOf(one(rw, { command, offset: 2n ** 52n, length: 1 })), P.EINVAL);
    }
  });

  it('writes on a read-only export are EPERM, reads still work', () => {
    for (const command of [P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES]) {
      assert.equal(errnoOf(one(ro, { command })), P.EPERM);
    }
    assert.equal(errnoOf(one(ro, { command: P.CMD_READ })), 'request');
    assert.equal(errnoOf(one(ro, { command: P.CMD_FLUSH, length: 0 })), 'request');
  });

  it('unknown commands and flags are EINVAL', () => {
    for (const command of [5, 8, 0xffff]) assert.equal(errnoOf(one(rw, { command })), P.EINVAL);
    assert.equal(errnoOf(one(rw, { command: P.CMD_READ, flags: P.CMD_FLAG_NO_HOLE })), P.EINVAL);
    assert.equal(errnoOf(one(rw, { command: P.CMD_WRITE, flags: P.CMD_FLAG_DF })), P.EINVAL);
    assert.equal(errnoOf(one(rw, { command: P.CMD_READ, flags: 0x8000 })), P.EINVAL);
  });

  it('zero-length and oversize READs are EINVAL; BLOCK_STATUS without a context is EINVAL', () => {
    assert.equal(errnoOf(one(rw, { length: 0 })), P.EINVAL);
    const big: Limits = { ...rw, size: 2 ** 40 };
    assert.equal(errnoOf(one(big, { length: P.PAYLOAD_BYTES_MAX + 1 })), P.EINVAL);
    assert.equal(errnoOf(one(big, { length: P.PAYLOAD_BYTES_MAX })), 'request');
    assert.equal(errnoOf(one({ ...rw, baseAllocationId: 0 }, { command: P.CMD_BLOCK_STATUS })), P.EINVAL);
  });

  it('a bad magic is fatal', () => {
    const queue = new ChunkQueue();
    const header = requestHeader({ flags: 0, command: 0, handle: 1n, offset: 0n, length: 1 });
    header[0] ^= 1;
    queue.push(header);
    assert.deepEqual(new RequestParser(rw as ExportLimits).next(queue), {
      kind: 'fatal',
      reason: 'bad request magic',
    });
  });

  it('validateRequest agrees with the reference for random fields', () => {
    fc.assert(
      fc.property(arbLimits, arbFields(2 ** 40), (limits, f) => {
        const offset = f.offset >= 2n ** 52n ? Number.MAX_SAFE_INTEGER : Number(f.offset);
        const got = validateRequest(
          {
            command: f.command,
            flags: f.flags,
            handle: Buffer.alloc(8),
            offset,
            length: f.length,
            payload: [],
          },
          limits as ExportLimits,
        );
        const want = refError(f.command, f.flags, f.offset, f.length, limits);
        assert.equal(got?.error ?? 0, want);
      }),
      fcParams(1000),
    );
  });
});

describe('RequestParser with an oversize WRITE', () => {
  it('drops the payload as it arrives (never buffers it), rejects with EINVAL, stays in frame', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: P.PAYLOAD_BYTES_MAX + 1, max: P.PAYLOAD_BYTES_MAX + 3 * MiB }),
        fc.array(fc.integer({ min: 1, max: 4 * MiB }), { minLength: 1, maxLength: 20 }),
        fc.boolean(),
        (length, sizes, readOnly) => {
          const limits: Limits = { size: 2 ** 40, readOnly, structuredReplies: false, baseAllocationId: 0 };
          const parser = new RequestParser(limits as ExportLimits);
          const queue = new ChunkQueue();
          const header = requestHeader({ flags: 0, command: P.CMD_WRITE, handle: 9n, offset: 0n, length });
          const next = requestHeader({
            flags: 0,
            command: P.CMD_READ,
            handle: 10n,
            offset: 4096n,
            length: 4096,
          });
          queue.push(header);
          assert.equal(parser.next(queue), undefined);
          let sent = 0;
          let i = 0;
          const events: ParseEvent[] = [];
          const filler = Buffer.alloc(4 * MiB, 0xab);
          while (sent < length) {
            const n = Math.min(sizes[i++ % sizes.length], length - sent);
            sent += n;
            queue.push(
              sent === length ? Buffer.concat([filler.subarray(0, n), next]) : filler.subarray(0, n),
            );
            for (let e = parser.next(queue); e !== undefined; e = parser.next(queue)) events.push(e);
            if (sent < length) {
              assert.equal(queue.length, 0, 'oversize payload is being buffered');
              assert.equal(events.length, 0);
            }
          }
          assert.equal(events.length, 2);
          const [write, read] = events;
          assert.equal(write.kind, 'rejected');
          assert.ok(write.kind === 'rejected' && write.error === (readOnly ? P.EPERM : P.EINVAL));
          assert.ok(write.kind === 'rejected' && write.request.payload.length === 0);
          assert.equal(read.kind, 'request');
          assert.ok(read.kind === 'request' && read.request.handle.readBigUInt64BE(0) === 10n);
          assert.equal(queue.length, 0);
        },
      ),
      fcParams(15),
    );
  });
});
