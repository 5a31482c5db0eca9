/**
 * The engine's FIFO queue: order, compaction, and that a shifted item is let go at once (the
 * engine's action queue once kept a checkpoint's 30 MiB bitmap snapshot alive after it was
 * persisted: a 15 TiB primary held the bitmap twice while idle).
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { Queue } from '../../src/core/queue.js';

setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;

describe('Queue', () => {
  it('keeps FIFO order across compactions', () => {
    const q = new Queue<number>();
    let next = 0;
    let expect = 0;
    for (let round = 0; round < 50; round++) {
      for (let i = 0; i < 100 + round * 7; i++) q.push(next++);
      for (let i = 0; i < 90 + round * 5 && q.length > 0; i++) assert.equal(q.shift(), expect++);
      assert.equal(q.length, next - expect);
      assert.deepEqual([...q].slice(0, 1), q.length > 0 ? [expect] : []);
    }
    while (q.length > 0) assert.equal(q.shift(), expect++);
    assert.equal(q.shift(), undefined);
    assert.equal(q.peek(), undefined);
  });

  it('lets go of an item once it is shifted, whether the queue is empty then or not', async () => {
    for (const keepOne of [false, true]) {
      const q = new Queue<{ bits: Uint8Array }>();
      let ref: WeakRef<object> | undefined;
      (() => {
        const big = { bits: new Uint8Array(1 << 20) };
        ref = new WeakRef(big);
        q.push(big);
        if (keepOne) q.push({ bits: new Uint8Array(1) });
        q.shift();
      })();
      await new Promise((r) => setImmediate(r));
      gc();
      assert.equal(
        ref!.deref(),
        undefined,
        `the shifted item is collected (${keepOne ? 'one left' : 'empty'})`,
      );
      assert.equal(q.length, keepOne ? 1 : 0);
    }
  });
});
