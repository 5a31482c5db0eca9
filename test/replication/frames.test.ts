import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { ChunkQueue } from '../../src/io/chunk-queue.js';
import {
  encodeFrame,
  FRAME_HEADER_BYTES,
  FRAME_PAYLOAD_BYTES_MAX,
  FrameDecoder,
  FrameType,
  type FrameTypeName,
  payloadBytes,
} from '../../src/replication/frames.js';

const seed = process.env.VOLREP_SEED ? Number(process.env.VOLREP_SEED) : undefined;
const typeName = fc.constantFrom(...(Object.keys(FrameType) as FrameTypeName[]));
const frameArb = fc.record({
  type: typeName,
  flags: fc.integer({ min: 0, max: 0xffff }),
  parts: fc.array(fc.uint8Array({ maxLength: 300 }), { maxLength: 4 }),
});

/** Feeds `bytes` to a fresh decoder in pieces cut at `cuts`, collecting every result. */
function decodeAll(bytes: Buffer, cuts: number[]) {
  const queue = new ChunkQueue();
  const decoder = new FrameDecoder();
  const out: { type: string; flags: number; payload: string }[] = [];
  let error: string | undefined;
  const points = [...new Set(cuts.map((c) => c % (bytes.length + 1)))].sort((a, b) => a - b);
  let from = 0;
  for (const to of [...points, bytes.length]) {
    queue.push(bytes.subarray(from, to));
    from = to;
    for (;;) {
      const r = decoder.next(queue);
      if (r === undefined) break;
      if (r.kind === 'error') {
        error = r.reason;
        break;
      }
      out.push({ type: r.frame.type, flags: r.frame.flags, payload: payloadBytes(r.frame).toString('hex') });
    }
    if (error) break;
  }
  return { out, error };
}

describe('replication frames', () => {
  it('round-trip any sequence of frames, however the stream is split', () => {
    fc.assert(
      fc.property(
        fc.array(frameArb, { maxLength: 8 }),
        fc.array(fc.nat(), { maxLength: 20 }),
        (frames, cuts) => {
          const bytes = Buffer.concat(
            frames.flatMap((f) =>
              encodeFrame(
                f.type,
                f.parts.map((p) => Buffer.from(p)),
                f.flags,
              ),
            ),
          );
          const { out, error } = decodeAll(bytes, cuts);
          assert.equal(error, undefined);
          assert.deepEqual(
            out,
            frames.map((f) => ({
              type: f.type,
              flags: f.flags,
              payload: Buffer.concat(f.parts.map((p) => Buffer.from(p))).toString('hex'),
            })),
          );
        },
      ),
      { seed, numRuns: 300 },
    );
  });

  it('any corruption of a frame is reported as an error, never an exception or a wrong frame', () => {
    fc.assert(
      fc.property(frameArb, fc.nat(), fc.integer({ min: 1, max: 255 }), (f, at, xor) => {
        const bytes = Buffer.concat(
          encodeFrame(
            f.type,
            f.parts.map((p) => Buffer.from(p)),
            f.flags,
          ),
        );
        const i = at % bytes.length;
        bytes[i] ^= xor;
        const { out, error } = decodeAll(bytes, [i]);
        // A flipped length can leave the decoder waiting for more bytes: that is fine too.
        assert.equal(out.length, 0, 'a corrupted frame must not be delivered');
        if (i < FRAME_HEADER_BYTES && i !== 8 && i !== 9 && i !== 10 && i !== 11) assert.ok(error);
      }),
      { seed, numRuns: 500 },
    );
  });

  it('random bytes never throw and never yield a frame', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 2000 }), fc.array(fc.nat(), { maxLength: 10 }), (raw, cuts) => {
        const { out } = decodeAll(Buffer.from(raw), cuts);
        assert.equal(out.length, 0);
      }),
      { seed, numRuns: 500 },
    );
  });

  it('never waits for more than the frame limit: a header claiming more is refused before its payload', () => {
    fc.assert(
      fc.property(
        typeName,
        fc.oneof(
          fc.nat({ max: FRAME_PAYLOAD_BYTES_MAX }),
          fc.integer({ min: FRAME_PAYLOAD_BYTES_MAX + 1, max: 0xffffffff }),
        ),
        (type, length) => {
          const [header] = encodeFrame(type, []);
          header.writeUInt32BE(length, 8);
          const queue = new ChunkQueue();
          queue.push(header);
          const r = new FrameDecoder().next(queue);
          if (length > FRAME_PAYLOAD_BYTES_MAX) {
            assert.equal(r?.kind, 'error', `a claim of ${length} bytes must be refused at once`);
          } else if (length > 0) {
            assert.equal(r, undefined, 'within the limit it waits for the payload');
          }
          // The caller buffers at most header + limit before the decoder yields or refuses.
          assert.ok(queue.length <= FRAME_HEADER_BYTES + FRAME_PAYLOAD_BYTES_MAX);
        },
      ),
      { seed, numRuns: 500 },
    );
  });

  it('refuses an oversize length at once, from the header alone', () => {
    const [header] = encodeFrame('ack', [Buffer.alloc(8)]);
    header.writeUInt32BE(0xffffffff, 8);
    const queue = new ChunkQueue();
    queue.push(header);
    const r = new FrameDecoder().next(queue);
    assert.equal(r?.kind, 'error');
    assert.match(r.kind === 'error' ? r.reason : '', /exceeds the limit/);
  });
});
