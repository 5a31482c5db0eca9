/**
 * Split brain, randomized (seed printed; VOLREP_SEED replays, VOLREP_PAIR_ROUNDS sets the rounds):
 * in each round both sides write while apart — the replica promoted and written while the old
 * primary also wrote — then they meet one of two ways:
 *   - `restart`: the old primary is started as a secondary without demote;
 *   - `listen`: the old primary kept serving and dials the promoted replica, which answers on its
 *     old replication address (`volrep primary --listen`).
 * The split brain must be detected every time, on both sides, with nothing written to either
 * volume. Then the side chosen at random is restarted with --discard-local-changes; exactly the
 * union of both sides' changed regions is sent, and the pair ends byte-identical.
 */
import assert from 'node:assert/strict';
import { after, describe, it } from 'node:test';
import { sha256File } from '../helpers/clients.js';
import { rounds, testSeed } from '../pair/pair.js';
import { Prng } from '../sim/prng.js';
import { REGION, type Site, Sites, writeRegions } from './sites.js';

const REGIONS = 64; // 4 MiB volumes

function ok(what: string, r: { status: number | null; stdout: string; stderr: string }): void {
  assert.equal(r.status, 0, `${what}: exit ${r.status}\n${r.stdout}\n${r.stderr}`);
}

function pick(prng: Prng, n: number): number[] {
  const out = new Set<number>();
  while (out.size < n) out.add(prng.int(REGIONS));
  return [...out];
}

async function hashes(sites: Sites): Promise<string[]> {
  return Promise.all([sha256File(sites.a.volume), sha256File(sites.b.volume)]);
}

describe('split brain: detected every time, resolved by --discard-local-changes', {
  timeout: 600_000,
}, () => {
  const seed = testSeed('split brain');
  const prng = new Prng(seed);
  const all: Sites[] = [];
  after(async () => {
    for (const sites of all) await sites.cleanup();
  });

  for (let round = 0; round < rounds(4); round++) {
    const meeting = round % 2 === 0 ? 'restart' : 'listen';
    it(`round ${round} (${meeting})`, async () => {
      const sites = await Sites.create('4M');
      all.push(sites);
      const { a, b } = sites;
      await sites.startSecondary(b);
      await sites.startPrimary(a);
      await sites.waitInSync(a, 'the initial sync');
      // The link is cut; the old primary writes on; the replica's site promotes it and writes too.
      await sites.kill(b);
      const writtenA = pick(prng, 1 + prng.int(6));
      const writtenB = pick(prng, 1 + prng.int(6));
      await writeRegions(a.primary!, writtenA, 0xa0 + round);
      ok('promote', sites.promote(b));
      await sites.startPrimary(b, meeting === 'listen' ? ['--listen', b.listen] : []);
      await writeRegions(b.primary!, writtenB, 0xb0 + round);
      await new Promise((r) => setTimeout(r, 50));
      const before = await hashes(sites);
      if (meeting === 'restart') {
        await sites.stop(a);
        await sites.startSecondary(a); // no demote: it keeps its writes
      }
      // (listen: the old primary has been dialing b.listen all along, and is answered now)
      for (const site of [a, b]) {
        await sites.waitDecision(site, 'splitBrain', `round ${round}, seed ${seed}`);
        assert.equal(
          await sites.metric(site, 'volrep_split_brain'),
          1,
          `${site.name} reports it in /metrics`,
        );
        assert.equal((await sites.status(site)).splitBrain, true);
      }
      assert.deepEqual(
        await hashes(sites),
        before,
        `round ${round}, seed ${seed}: the handshake wrote nothing`,
      );

      // The operator throws one side's writes away.
      const discard: Site = prng.chance(0.5) ? a : b;
      const keep = sites.other(discard);
      const keepDirty = await sites.dirtyRegions(keep);
      await sites.stop(a);
      await sites.stop(b);
      if (sites.role(keep) === 'secondary') ok('promote', sites.promote(keep));
      await sites.startSecondary(discard, ['--discard-local-changes']);
      assert.match(
        discard.secondary!.stderr(),
        /--discard-local-changes: the writes this side made apart are given up/,
      );
      const discardDirty = await sites.dirtyRegions(discard);
      const union = new Set([...keepDirty, ...discardDirty]);
      for (const r of [...writtenA, ...writtenB])
        assert.ok(union.has(r), `region ${r} written apart is in the union`);
      await sites.startPrimary(keep);
      await sites.waitInSync(keep, `round ${round}: the resync after the decision`);
      assert.equal(
        await sites.metric(keep, 'volrep_resync_bytes_total'),
        union.size * REGION,
        `round ${round}, seed ${seed}: only the union (${union.size} regions) is sent`,
      );
      assert.equal(await sites.metric(keep, 'volrep_split_brain'), 0);
      await sites.assertIdentical(`round ${round}, seed ${seed}`);
    });
  }
});
