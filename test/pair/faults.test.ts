/**
 * Faults during writes, each round followed by "wait until in sync, then volume and replica are
 * byte-identical": (a) SIGKILL of the secondary mid-write and a restart, (b) SIGKILL of the
 * primary mid-write and a restart with the same flags, (c) the link cut mid-write through a
 * FaultProxy (blackhole longer than the ack timeout, cut after N bytes, reset), then restored.
 * Randomized from one seed (printed; VOLREP_SEED replays it), VOLREP_PAIR_ROUNDS rounds per kind.
 */
import assert from 'node:assert/strict';
import { after, describe, it } from 'node:test';
import { waitFor } from '../helpers/clients.js';
import { Prng } from '../sim/prng.js';
import { Pair, rounds, testSeed, Writer } from './pair.js';

const SIZE = 16 * 1024 * 1024;
const ROUNDS = rounds(10);
const SEED = testSeed('faults.test.ts');

/** Random delay in [min, max) ms from the PRNG, waited as a deadline for writes in flight. */
function pause(prng: Prng, min: number, max: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, min + prng.int(max - min)));
}

describe('pair faults mid-write', { timeout: 240_000 }, () => {
  const pairs: Pair[] = [];
  after(async () => {
    for (const p of pairs) await p.cleanup();
  });

  async function startPair(prng: Prng, opts: ConstructorParameters<typeof Pair>[0]): Promise<Pair> {
    const pair = new Pair({ size: '16M', ...opts });
    pairs.push(pair);
    await pair.start();
    // Some content before the first fault, replicated as normal updates.
    const w = new Writer(prng, SIZE);
    await w.start(pair.primary!.nbd);
    await w.waitAcknowledged(20);
    await w.stop();
    await pair.waitInSync('initial', 30_000);
    await pair.assertIdentical('initial');
    return pair;
  }

  it(`(a) SIGKILL of the secondary mid-write, restart (${ROUNDS} rounds, seed ${SEED})`, async () => {
    const prng = new Prng(SEED ^ 0xa);
    const pair = await startPair(prng, {});
    for (let round = 1; round <= ROUNDS; round++) {
      const what = `(a) round ${round} seed ${SEED}`;
      const w = new Writer(prng, SIZE, 1 + prng.int(8));
      await w.start(pair.primary!.nbd);
      await w.waitAcknowledged(1 + prng.int(30));
      await pair.killSecondary();
      await pause(prng, 0, 300); // writes go on while the secondary is gone
      await pair.startSecondary();
      await pause(prng, 0, 200); // and while it reconnects / resyncs
      await w.stop();
      assert.equal(w.failed, 0, `${what}: NBD writes must not fail: ${w.firstError?.message}`);
      await pair.waitInSync(what);
      await pair.assertIdentical(what);
    }
    assert.ok((await pair.primaryMetric('volrep_reconnects_total')) >= ROUNDS);
  });

  it(`(b) SIGKILL of the primary mid-write, restart with the same flags (${ROUNDS} rounds, seed ${SEED})`, async () => {
    const prng = new Prng(SEED ^ 0xb);
    const pair = await startPair(prng, {});
    for (let round = 1; round <= ROUNDS; round++) {
      const what = `(b) round ${round} seed ${SEED}`;
      const w = new Writer(prng, SIZE, 1 + prng.int(8));
      await w.start(pair.primary!.nbd);
      await w.waitAcknowledged(1 + prng.int(30));
      await pair.killPrimary();
      await w.stop(); // its requests in flight fail: the server is gone
      await pair.startPrimary();
      if (prng.chance(0.5)) {
        // Write again while the restarted primary reconnects and resyncs.
        const w2 = new Writer(prng, SIZE, 1 + prng.int(4));
        await w2.start(pair.primary!.nbd);
        await w2.waitAcknowledged(1 + prng.int(20));
        await w2.stop();
        assert.equal(w2.failed, 0, `${what}: NBD writes after restart: ${w2.firstError?.message}`);
      }
      await pair.waitInSync(what);
      await pair.assertIdentical(what);
    }
  });

  it(`(c) link cut mid-write through a proxy, then restored (${ROUNDS}+ rounds, seed ${SEED})`, async () => {
    const prng = new Prng(SEED ^ 0xc);
    const pair = await startPair(prng, { proxy: true, primaryExtra: ['--ack-timeout', '1s'] });
    const proxy = pair.proxy!;
    const kinds = ['blackhole', 'cutAfter', 'reset'] as const;
    for (let round = 1; round <= ROUNDS * kinds.length; round++) {
      const kind = kinds[(round - 1) % kinds.length];
      const what = `(c) round ${round} ${kind} seed ${SEED}`;
      const w = new Writer(prng, SIZE, 1 + prng.int(8));
      await w.start(pair.primary!.nbd);
      await w.waitAcknowledged(1 + prng.int(30));
      const reconnectsBefore = await pair.primaryMetric('volrep_reconnects_total');
      if (kind === 'blackhole') {
        proxy.setMode({ kind: 'blackhole' });
        // Longer than the ack timeout: the primary must give up on the link by itself.
        await pair.waitPeerState(['disconnected', 'connecting'], what, 5_000);
        await pause(prng, 0, 300);
      } else if (kind === 'cutAfter') {
        // The live connection is cut at its next chunk; reconnections get N bytes each.
        proxy.setMode({ kind: 'cutAfter', bytes: prng.int(64 * 1024) });
        await pause(prng, 100, 800);
      } else {
        proxy.resetAll();
        await pause(prng, 0, 300);
      }
      proxy.setMode({ kind: 'pass' });
      proxy.resetAll(); // connections half-dead from the fault (e.g. a hello lost in the blackhole)
      await w.stop();
      assert.equal(w.failed, 0, `${what}: NBD writes must not fail: ${w.firstError?.message}`);
      await pair.waitInSync(what);
      if (kind !== 'cutAfter') {
        await waitFor(
          async () => (await pair.primaryMetric('volrep_reconnects_total')) > reconnectsBefore,
          `${what}: a reconnect was counted`,
          5_000,
        );
      }
      await pair.assertIdentical(what);
    }
  });
});
