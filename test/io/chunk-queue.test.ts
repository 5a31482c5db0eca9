import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { ChunkQueue } from '../../src/io/chunk-queue.js';
import { fcParams } from '../nbd/wire.js';

type Op =
  | { kind: 'push'; bytes: Uint8Array }
  | { kind: 'take'; n: number }
  | { kind: 'takeViews'; n: number }
  | { kind: 'discard'; n: number }
  | { kind: 'takeTooMuch'; extra: number };

const arbOp: fc.Arbitrary<Op> = fc.oneof(
  {
    weight: 4,
    arbitrary: fc.record({ kind: fc.constant('push' as const), bytes: fc.uint8Array({ maxLength: 40 }) }),
  },
  { weight: 3, arbitrary: fc.record({ kind: fc.constant('take' as const), n: fc.nat({ max: 90 }) }) },
  { weight: 3, arbitrary: fc.record({ kind: fc.constant('takeViews' as const), n: fc.nat({ max: 90 }) }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('discard' as const), n: fc.nat({ max: 120 }) }) },
  {
    weight: 1,
    arbitrary: fc.record({
      kind: fc.constant('takeTooMuch' as const),
      extra: fc.integer({ min: 1, max: 10 }),
    }),
  },
);

/** True when `view` is a window into one of `chunks` (shares its memory), i.e. not a copy. */
function isViewOf(view: Buffer, chunks: Buffer[]): boolean {
  return chunks.some(
    (c) =>
      c.buffer === view.buffer &&
      view.byteOffset >= c.byteOffset &&
      view.byteOffset + view.length <= c.byteOffset + c.length,
  );
}

describe('ChunkQueue', () => {
  it('take/takeViews/discard agree with a Buffer.concat model under random pushes and reads', () => {
    fc.assert(
      fc.property(fc.array(arbOp, { maxLength: 80 }), (ops) => {
        const queue = new ChunkQueue();
        let model = Buffer.alloc(0);
        const pushed: Buffer[] = [];
        for (const op of ops) {
          switch (op.kind) {
            case 'push': {
              // A fresh ArrayBuffer per chunk, so views can be told from copies.
              const chunk = Buffer.from(op.bytes);
              queue.push(chunk);
              pushed.push(chunk);
              model = Buffer.concat([model, chunk]);
              break;
            }
            case 'take': {
              const n = Math.min(op.n, model.length);
              const got = queue.take(n);
              assert.equal(got.length, n);
              assert.deepEqual(Buffer.from(got), model.subarray(0, n));
              model = model.subarray(n);
              break;
            }
            case 'takeViews': {
              const n = Math.min(op.n, model.length);
              const views = queue.takeViews(n);
              assert.deepEqual(Buffer.concat(views), model.subarray(0, n));
              for (const v of views) {
                assert.ok(v.length > 0, 'takeViews returned an empty view');
                assert.ok(isViewOf(v, pushed), 'takeViews copied instead of returning a view');
              }
              model = model.subarray(n);
              break;
            }
            case 'discard': {
              const dropped = queue.discard(op.n);
              assert.equal(dropped, Math.min(op.n, model.length));
              model = model.subarray(dropped);
              break;
            }
            case 'takeTooMuch': {
              const n = model.length + op.extra;
              assert.throws(() => queue.take(n), RangeError);
              assert.throws(() => queue.takeViews(n), RangeError);
              break;
            }
          }
          assert.equal(queue.length, model.length);
        }
        // Whatever is left drains exactly.
        assert.deepEqual(Buffer.from(queue.take(model.length)), model);
        assert.equal(queue.length, 0);
      }),
      fcParams(1000),
    );
  });

  it('take returns a view (no copy) when the bytes lie in one chunk, a copy when they straddle', () => {
    const queue = new ChunkQueue();
    const a = Buffer.from([1, 2, 3, 4]);
    const b = Buffer.from([5, 6, 7, 8]);
    queue.push(a);
    queue.push(b);
    const first = queue.take(2);
    assert.ok(isViewOf(first, [a]));
    assert.deepEqual([...first], [1, 2]);
    const straddle = queue.take(4);
    assert.ok(!isViewOf(straddle, [a, b]));
    assert.deepEqual([...straddle], [3, 4, 5, 6]);
    assert.equal(queue.length, 2);
    assert.equal(queue.discard(10), 2);
    assert.equal(queue.length, 0);
    assert.equal(queue.take(0).length, 0);
    assert.deepEqual(queue.takeViews(0), []);
  });

  it('ignores empty pushes', () => {
    const queue = new ChunkQueue();
    queue.push(Buffer.alloc(0));
    assert.equal(queue.length, 0);
    queue.push(Buffer.from([9]));
    queue.push(Buffer.alloc(0));
    assert.deepEqual(
      queue.takeViews(1).map((v) => [...v]),
      [[9]],
    );
  });
});
