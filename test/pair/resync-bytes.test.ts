/**
 * Resync sends only what differs: after an outage (the secondary killed, or the link blackholed
 * past the ack timeout) during which the test wrote to K distinct regions, volrep_resync_bytes_total
 * grew by at most K × regionSize (the metric counts payload bytes), and the pair ends identical.
 * Regions that read back all-zero go as zero updates (volrep_resync_zero_bytes_total), without
 * their data, and the replica keeps its holes.
 */
import assert from 'node:assert/strict';
import { statSync, utimesSync } from 'node:fs';
import { after, describe, it } from 'node:test';
import { NbdClient } from '../../src/nbd/client.js';
import { Prng } from '../sim/prng.js';
import { Pair, prngBytes, REGION, testSeed } from './pair.js';

const SIZE = 32 * 1024 * 1024;
const REGIONS = SIZE / REGION;
const SEED = testSeed('resync-bytes.test.ts');

/** K distinct regions, each written 1-3 times inside its bounds (some writes partial). */
async function writeRegions(client: NbdClient, prng: Prng, k: number): Promise<Set<number>> {
  const chosen = new Set<number>();
  while (chosen.size < k) chosen.add(prng.int(REGIONS));
  for (const r of chosen) {
    const times = 1 + prng.int(3);
    for (let i = 0; i < times; i++) {
      const length = 1 + prng.int(REGION);
      const offset = r * REGION + prng.int(REGION - length + 1);
      if (prng.chance(0.15)) await client.writeZeroes(offset, length);
      else await client.write(offset, prngBytes(prng, length));
    }
  }
  return chosen;
}

describe('resync sends only the regions written during an outage', { timeout: 120_000 }, () => {
  const pairs: Pair[] = [];
  after(async () => {
    for (const p of pairs) await p.cleanup();
  });

  for (const outage of ['secondary killed', 'link blackholed'] as const) {
    it(`${outage}: resync bytes ≤ K × regionSize (seed ${SEED})`, async () => {
      const prng = new Prng(SEED ^ (outage === 'secondary killed' ? 1 : 2));
      const pair = new Pair({
        size: '32M',
        proxy: outage === 'link blackholed',
        primaryExtra: ['--ack-timeout', '1s'],
      });
      pairs.push(pair);
      await pair.start();
      await pair.waitInSync('initial sync', 30_000);
      const client = await NbdClient.connect(pair.primary!.nbd.host, pair.primary!.nbd.port, 'volrep');
      try {
        for (let round = 1; round <= 3; round++) {
          const what = `${outage}, round ${round}, seed ${SEED}`;
          // Normal replication first: everything acked before the outage starts.
          await writeRegions(client, prng, 5);
          await pair.waitInSync(`${what}: before the outage`);
          const before = await pair.primaryMetric('volrep_resync_bytes_total');
          const k = 1 + prng.int(40);
          let regions: Set<number>;
          if (outage === 'secondary killed') {
            await pair.killSecondary();
            await pair.waitPeerState(['disconnected', 'connecting'], what);
            regions = await writeRegions(client, prng, k);
            await pair.startSecondary();
          } else {
            pair.proxy!.setMode({ kind: 'blackhole' });
            // Written into the blackhole (sent, never acked), and after the ack timeout dropped the link.
            regions = await writeRegions(client, prng, k);
            await pair.waitPeerState(['disconnected', 'connecting'], what);
            const more = await writeRegions(client, prng, 1 + prng.int(5));
            for (const r of more) regions.add(r);
            pair.proxy!.setMode({ kind: 'pass' });
            pair.proxy!.resetAll();
          }
          const dirty = (await pair.primaryStatus()).dirtyRegions;
          await pair.waitInSync(what);
          const sent = (await pair.primaryMetric('volrep_resync_bytes_total')) - before;
          assert.ok(
            sent <= regions.size * REGION,
            `${what}: resync sent ${sent} bytes for ${regions.size} written regions ` +
              `(at most ${regions.size * REGION}); dirty regions before the resync: ${dirty}`,
          );
          assert.ok(sent > 0, `${what}: the written regions must have been resynced`);
          await pair.assertIdentical(what);
        }
      } finally {
        await client.close();
      }
    });
  }
});

describe('resync sends all-zero regions as zero updates', { timeout: 120_000 }, () => {
  const pairs: Pair[] = [];
  after(async () => {
    for (const p of pairs) await p.cleanup();
  });

  it(`the initial full sync of a sparse volume sends no data and leaves the replica sparse; zeroed regions resync as zeroes (seed ${SEED})`, async () => {
    const prng = new Prng(SEED ^ 3);
    const pair = new Pair({ size: '32M' });
    pairs.push(pair);
    // Touched after `volrep create` (its change time moves): no longer provably all zeros as
    // created, so the pair syncs in full, reading every region; the holes go as zero updates.
    utimesSync(pair.primaryVolume, new Date(), new Date());
    await pair.start();
    await pair.waitInSync('initial sync', 30_000);
    const zeroBytes = await pair.primaryMetric('volrep_resync_zero_bytes_total');
    assert.equal(await pair.primaryMetric('volrep_resync_bytes_total'), SIZE, 'a full sync of every region');
    assert.equal(zeroBytes, SIZE, 'every region of the fresh volume is a hole: all as zero updates');
    const allocated = statSync(pair.secondaryVolume).blocks * 512;
    assert.ok(allocated <= REGION, `the replica stays sparse: ${allocated} bytes allocated`);

    // Data in some regions, then an outage in which some are zeroed again and others written.
    const client = await NbdClient.connect(pair.primary!.nbd.host, pair.primary!.nbd.port, 'volrep');
    try {
      const regions = [...new Set(Array.from({ length: 24 }, () => prng.int(REGIONS)))];
      for (const r of regions) await client.write(r * REGION, prngBytes(prng, REGION));
      await pair.waitInSync('with data');
      await pair.killSecondary();
      await pair.waitPeerState(['disconnected', 'connecting'], 'secondary killed');
      const zeroed = regions.slice(0, regions.length / 2);
      const written = regions.slice(regions.length / 2);
      for (const r of zeroed) await client.writeZeroes(r * REGION, REGION);
      for (const r of written) await client.write(r * REGION, prngBytes(prng, REGION));
      const before = {
        resync: await pair.primaryMetric('volrep_resync_bytes_total'),
        zero: await pair.primaryMetric('volrep_resync_zero_bytes_total'),
      };
      await pair.startSecondary();
      await pair.waitInSync('after the outage');
      const resync = (await pair.primaryMetric('volrep_resync_bytes_total')) - before.resync;
      const zero = (await pair.primaryMetric('volrep_resync_zero_bytes_total')) - before.zero;
      assert.equal(resync, regions.length * REGION, 'every region written in the outage, and only those');
      assert.equal(zero, zeroed.length * REGION, 'exactly the zeroed ones as zero updates');
      await pair.assertIdentical('after the outage');
    } finally {
      await client.close();
    }
  });
});
