/**
 * --mode sync: a write is acknowledged to the NBD client only once the secondary has acked it as
 * durable. Each round writes with volrep's NBD client and SIGKILLs the primary the moment the
 * write is acknowledged: the data must already be in the replica file (read directly).
 */
import assert from 'node:assert/strict';
import { after, describe, it } from 'node:test';
import { NbdClient } from '../../src/nbd/client.js';
import { readRange } from '../helpers/clients.js';
import { Prng } from '../sim/prng.js';
import { Pair, prngBytes, rounds, testSeed } from './pair.js';

const SIZE = 16 * 1024 * 1024;
const SEED = testSeed('sync-mode.test.ts');
const ROUNDS = rounds(8);

describe('--mode sync: acknowledged means on the replica', { timeout: 120_000 }, () => {
  let pair: Pair | undefined;
  after(async () => {
    await pair?.cleanup();
  });

  it(`SIGKILL of the primary right after each acknowledged write (${ROUNDS} rounds, seed ${SEED})`, async () => {
    const prng = new Prng(SEED);
    pair = new Pair({ size: '16M', primaryExtra: ['--mode', 'sync'] });
    await pair.start();
    for (let round = 1; round <= ROUNDS; round++) {
      const what = `round ${round} seed ${SEED}`;
      if (!pair.primary) await pair.startPrimary();
      await pair.waitInSync(`${what}: before the write`);
      const { host, port } = pair.primary!.nbd;
      const client = await NbdClient.connect(host, port, 'volrep');
      // A few writes acknowledged normally, then the one the primary dies on.
      const writes: { offset: number; data: Buffer }[] = [];
      const count = 1 + prng.int(4);
      for (let i = 0; i < count; i++) {
        const length = 1 + prng.int(256 * 1024);
        writes.push({ offset: prng.int(SIZE - length), data: prngBytes(prng, length) });
      }
      const child = pair.primary!.child;
      for (let i = 0; i < count; i++) {
        await client.write(writes[i].offset, writes[i].data);
        if (i === count - 1) child.kill('SIGKILL'); // in the same turn as the acknowledgement
      }
      await pair.killPrimary();
      // Later writes may overwrite earlier ones: compare against the last write of each byte.
      const expected = new Map<number, number>();
      for (const w of writes) for (let b = 0; b < w.data.length; b++) expected.set(w.offset + b, w.data[b]);
      for (const w of writes) {
        const onReplica = readRange(pair.secondaryVolume, w.offset, w.data.length);
        for (let b = 0; b < w.data.length; b++) {
          if (onReplica[b] !== expected.get(w.offset + b)) {
            assert.fail(
              `${what}: acknowledged write of ${w.data.length} bytes at ${w.offset} is not on the replica ` +
                `(first difference at byte ${w.offset + b})\n${await pair.describe()}`,
            );
          }
        }
      }
    }
    await pair.startPrimary();
    await pair.waitInSync('after the last round');
    await pair.assertIdentical('after the last round');
  });
});
