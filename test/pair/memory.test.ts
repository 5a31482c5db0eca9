/**
 * Bounded memory (I6): with the secondary blackholed behind a proxy and a long ack timeout (the
 * link stays "up"), `--window 8M`, the test writes 4× the window. Writes wait once the window is
 * full; the primary's RSS stays bounded; once the link is cut, the waiting writes complete and
 * every written region is dirty. After the link is restored the pair ends identical.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { after, describe, it } from 'node:test';
import { NbdClient } from '../../src/nbd/client.js';
import { Prng } from '../sim/prng.js';
import { getJson, Pair, prngBytes, REGION } from './pair.js';

const MiB = 1024 * 1024;
const WINDOW = 8 * MiB;
const TOTAL = 4 * WINDOW;
const WRITE = MiB;
const DEPTH = 4;
const RSS_LIMIT = 300 * MiB;

function rssBytes(pid: number): number {
  const m = /^VmRSS:\s+(\d+) kB$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  assert.ok(m, `no VmRSS for ${pid}`);
  return Number(m[1]) * 1024;
}

describe('bounded memory while the secondary is unreachable', { timeout: 120_000 }, () => {
  let pair: Pair | undefined;
  let client: NbdClient | undefined;
  after(async () => {
    await client?.close().catch(() => {});
    await pair?.cleanup();
  });

  it('--window 8M, 32M written into a blackhole: writes wait, RSS bounded, all regions dirty', async () => {
    pair = new Pair({
      size: '64M',
      proxy: true,
      primaryExtra: ['--assume-clean', '--window', '8M', '--ack-timeout', '60s'],
    });
    await pair.start();
    await pair.waitInSync('start', 20_000);
    const pid = pair.primary!.child.pid!;
    let maxRss = rssBytes(pid);
    const sampler = setInterval(() => {
      try {
        maxRss = Math.max(maxRss, rssBytes(pid));
      } catch {}
    }, 50);
    try {
      pair.proxy!.setMode({ kind: 'blackhole' });
      client = await NbdClient.connect(pair.primary!.nbd.host, pair.primary!.nbd.port, 'volrep');
      const prng = new Prng(1);
      const offsets: number[] = [];
      for (let at = 0; at < TOTAL; at += WRITE) offsets.push(at + 16 * MiB);
      let done = 0;
      let failure: Error | undefined;
      const queue = [...offsets];
      const c = client;
      const workers = Array.from({ length: DEPTH }, async () => {
        for (let at = queue.shift(); at !== undefined; at = queue.shift()) {
          try {
            await c.write(at, prngBytes(prng, WRITE));
            done += WRITE;
          } catch (err) {
            failure ??= err as Error;
          }
        }
      });
      // The window fills, then writes wait: give them time to (wrongly) all complete.
      const stalled = await Promise.race([
        Promise.all(workers).then(() => false),
        new Promise<boolean>((resolve) => setTimeout(() => resolve(true), 3000)),
      ]);
      const status = await pair.primaryStatus();
      assert.equal(status.peer.state, 'connected', 'the blackholed link is still up (long ack timeout)');
      assert.ok(
        stalled && done <= WINDOW + DEPTH * WRITE,
        `writes must wait once the ${WINDOW}-byte window is full: ${done} of ${TOTAL} bytes completed ` +
          `with nothing acked; status ${JSON.stringify(status)}`,
      );
      assert.ok(status.pendingBytes <= WINDOW, `pendingBytes ${status.pendingBytes} within the window`);

      // Cut the link (and keep it down): the waiting writes complete locally, all dirty.
      pair.proxy!.setMode({ kind: 'refuse' });
      await pair.waitPeerState(['disconnected', 'connecting'], 'link cut');
      await Promise.race([
        Promise.all(workers),
        new Promise((_, reject) =>
          setTimeout(() => reject(new Error(`writes still waiting after the link dropped: ${done}`)), 20_000),
        ),
      ]);
      assert.equal(failure, undefined, `writes must not fail: ${failure?.message}`);
      assert.equal(done, TOTAL);
      const dirty = (await getJson(pair.primary!.http!, '/dirty')) as { ranges: [number, number][] };
      // Runs of region indexes, [first, last] inclusive.
      const isDirty = (region: number) =>
        dirty.ranges.some(([first, last]) => region >= first && region <= last);
      const missing: number[] = [];
      for (let at = offsets[0]; at < offsets[0] + TOTAL; at += REGION) {
        if (!isDirty(at / REGION)) missing.push(at / REGION);
      }
      assert.deepEqual(missing, [], `every written region is dirty; /dirty: ${JSON.stringify(dirty)}`);
      assert.ok((await pair.primaryStatus()).dirtyRegions >= TOTAL / REGION);
    } finally {
      clearInterval(sampler);
    }
    console.log(
      `primary peak RSS while writing ${TOTAL} bytes with a ${WINDOW}-byte window: ${maxRss} bytes`,
    );
    assert.ok(maxRss < RSS_LIMIT, `primary RSS peaked at ${maxRss} bytes (limit ${RSS_LIMIT})`);

    pair.proxy!.setMode({ kind: 'pass' });
    await pair.waitInSync('after the link is restored', 30_000);
    await pair.assertIdentical('after the link is restored');
  });
});
