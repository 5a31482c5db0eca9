/**
 * The handshake's decision table (src/replication/generations.ts, README "Failover and failback"),
 * every row in both directions, with real processes: a fresh pair per case, A → B as created or
 * B → A after a planned switchover, then the row's history, then the meeting. A refusal must write
 * nothing to either volume; a resync must send exactly the regions written apart.
 */
import assert from 'node:assert/strict';
import { copyFileSync, cpSync, rmSync } from 'node:fs';
import { after, describe, it } from 'node:test';
import { sha256File, volrepAsync } from '../helpers/clients.js';
import { volrep } from '../helpers/daemon.js';
import { REGION, type Site, Sites, writeRegions } from './sites.js';

function ok(what: string, r: { status: number | null; stdout: string; stderr: string }): void {
  assert.equal(r.status, 0, `${what}: exit ${r.status}\n${r.stdout}\n${r.stderr}`);
}

/**
 * A planned switchover of a healthy pair: the primary stops (flushes) once in sync, both change
 * role, and the reversed pair starts with nothing to resync.
 */
async function switchover(sites: Sites, primary: Site): Promise<void> {
  const secondary = sites.other(primary);
  await sites.waitInSync(primary, 'before the switchover');
  await sites.stop(primary);
  await sites.stop(secondary);
  ok('demote', sites.demote(primary));
  ok('promote', sites.promote(secondary));
  await sites.startSecondary(primary);
  await sites.startPrimary(secondary);
  await sites.waitInSync(secondary, 'after the switchover');
  assert.equal(await sites.metric(secondary, 'volrep_resync_bytes_total'), 0, 'a switchover resyncs nothing');
}

/** A fresh pair in sync, `direction` saying which site is the primary. */
async function freshPair(direction: 'A→B' | 'B→A'): Promise<{ sites: Sites; p: Site; s: Site }> {
  const sites = await Sites.create('4M');
  await sites.startSecondary(sites.b);
  await sites.startPrimary(sites.a);
  await sites.waitInSync(sites.a, 'the initial sync');
  if (direction === 'B→A') await switchover(sites, sites.a);
  const p = direction === 'A→B' ? sites.a : sites.b;
  return { sites, p, s: sites.other(p) };
}

/** `site`, stopped, writes `regions` as a primary on its own (the peer down) and stops again. */
async function writeApart(sites: Sites, site: Site, regions: number[], fill: number): Promise<void> {
  if (site.secondary) await sites.stop(site);
  if (sites.role(site) === 'secondary') ok('promote', sites.promote(site));
  if (!site.primary) await sites.startPrimary(site);
  await writeRegions(site.primary!, regions, fill);
  const st = await sites.status(site);
  assert.notEqual(
    st.generation.base,
    null,
    `a write apart starts a generation: ${JSON.stringify(st.generation)}`,
  );
  await sites.stop(site);
}

/** `volrep create --force --secondary-of` on `site`: a replica that never held anything. */
function recreate(sites: Sites, site: Site) {
  return volrep([
    'create',
    '--force',
    '--volume',
    site.volume,
    '--size',
    '4M',
    '--secondary-of',
    sites.volumeId,
  ]);
}

/** Both volumes' hashes, to prove a refused handshake wrote nothing. */
async function hashes(sites: Sites): Promise<string[]> {
  return Promise.all([sha256File(sites.a.volume), sha256File(sites.b.volume)]);
}

/** Both sides report `decision` (the primary from the refusal or the welcome, the secondary its own). */
async function bothDecide(sites: Sites, p: Site, s: Site, decision: string): Promise<void> {
  const ps = await sites.waitDecision(p, decision, 'the primary');
  const ss = await sites.waitDecision(s, decision, 'the secondary');
  for (const st of [ps, ss]) {
    assert.ok(st.generation.current, JSON.stringify(st));
    assert.ok(
      st.peerGeneration?.current !== undefined,
      `the peer's generation is shown: ${JSON.stringify(st)}`,
    );
  }
}

for (const direction of ['A→B', 'B→A'] as const) {
  describe(`handshake decisions, ${direction}`, () => {
    const all: Sites[] = [];
    after(async () => {
      for (const sites of all) await sites.cleanup();
    });

    it('same generation, nothing written since: in sync, nothing sent', async () => {
      const { sites, p, s } = await freshPair(direction);
      all.push(sites);
      await sites.stop(p);
      await sites.stop(s);
      await sites.startSecondary(s);
      await sites.startPrimary(p);
      await sites.waitInSync(p, 'after a restart of both');
      const st = await sites.status(p);
      assert.equal(st.handshake.decision, 'resync');
      assert.equal(st.handshake.summary, 'in sync');
      assert.equal(st.generation.current, st.peerGeneration.current);
      assert.equal(await sites.metric(p, 'volrep_resync_bytes_total'), 0);
      await sites.assertIdentical('in sync');
    });

    it("the secondary's generation is the primary's base: exactly the regions written apart are sent", async () => {
      const { sites, p, s } = await freshPair(direction);
      all.push(sites);
      const before = (await sites.status(p)).generation.current;
      const sent = await sites.metric(p, 'volrep_resync_bytes_total');
      await sites.stop(s);
      await writeRegions(p.primary!, [3, 4, 20, 63], 0x5a);
      const st = await sites.status(p);
      assert.equal(st.generation.base, before, 'the first write apart moved the generation to the base');
      assert.notEqual(st.generation.current, before);
      await sites.startSecondary(s);
      await sites.waitInSync(p, 'after the resync');
      assert.equal((await sites.metric(p, 'volrep_resync_bytes_total')) - sent, 4 * REGION);
      const after = await sites.status(p);
      assert.equal(after.generation.base, null, 'the base is dropped once the replica holds the generation');
      assert.equal((await sites.status(s)).generation.current, after.generation.current);
      await sites.assertIdentical('after the resync');
    });

    it("the primary's generation is the secondary's base: refused, nothing written, the newer side named", async () => {
      const { sites, p, s } = await freshPair(direction);
      all.push(sites);
      await sites.stop(p);
      await writeApart(sites, s, [7, 8], 0x77);
      const h = await hashes(sites);
      // The newer side started as a secondary without demote: it keeps its writes.
      await sites.startSecondary(s);
      await sites.startPrimary(p);
      await bothDecide(sites, p, s, 'peerNewer');
      assert.match((await sites.status(p)).handshake.summary, /newer data/);
      assert.match(p.primary!.stderr(), /volrep promote/);
      assert.deepEqual(await hashes(sites), h, 'nothing written by the refused handshake');
    });

    it('both wrote apart from the same generation: split brain on both sides, nothing written', async () => {
      const { sites, p, s } = await freshPair(direction);
      all.push(sites);
      await sites.stop(s);
      await writeRegions(p.primary!, [1, 2], 0x11);
      await sites.stop(p);
      await writeApart(sites, s, [2, 9], 0x22);
      const h = await hashes(sites);
      await sites.startSecondary(s);
      await sites.startPrimary(p);
      await bothDecide(sites, p, s, 'splitBrain');
      for (const site of [p, s]) {
        assert.equal(await sites.metric(site, 'volrep_split_brain'), 1, site.name);
        const st = await sites.status(site);
        assert.equal(st.splitBrain, true);
        assert.match(st.handshake.summary, /^split brain since .*--discard-local-changes/);
      }
      const printed = await volrepAsync(['status', '--http', p.primary!.http!]);
      assert.match(printed.stdout, /^handshake\s+split brain since .*--discard-local-changes/m);
      assert.match(printed.stdout, /^generation\s+[0-9a-f]{8} \(wrote apart since [0-9a-f]{8}\)$/m);
      assert.match(printed.stdout, /^peer gen\.\s+[0-9a-f]{8} \(wrote apart since [0-9a-f]{8}\)$/m);
      assert.deepEqual(await hashes(sites), h, 'nothing written by the refused handshake');
    });

    it("the secondary's generation is only in the primary's history: a full sync on request only", async () => {
      const { sites, p, s } = await freshPair(direction);
      all.push(sites);
      // A replica restored from an old backup: its metadata and volume as they were at generation G.
      await sites.stop(s);
      const backup = `${sites.dir}/backup`;
      cpSync(`${s.volume}.volrep`, `${backup}.volrep`, { recursive: true });
      copyFileSync(s.volume, backup);
      await writeRegions(p.primary!, [5], 0x33);
      await sites.startSecondary(s);
      await sites.waitInSync(p, 'the replica takes the new generation');
      await sites.stop(s);
      rmSync(`${s.volume}.volrep`, { recursive: true });
      cpSync(`${backup}.volrep`, `${s.volume}.volrep`, { recursive: true });
      copyFileSync(backup, s.volume);
      const h = await hashes(sites);
      await sites.startSecondary(s);
      await bothDecide(sites, p, s, 'fullOnRequest');
      assert.match((await sites.status(s)).handshake.summary, /create --force/);
      assert.deepEqual(await hashes(sites), h, 'nothing written by the refused handshake');
    });

    it('nothing in common: unrelated data refused; re-creating the replica gives a full sync', async () => {
      const { sites, p, s } = await freshPair(direction);
      all.push(sites);
      await sites.stop(s);
      await sites.stop(p);
      // The secondary re-created, then promoted with --force before any sync: a history of its own.
      ok('create --force', recreate(sites, s));
      const refused = sites.promote(s);
      assert.equal(refused.status, 2, 'a replica that was never in sync is not promoted without --force');
      assert.match(refused.stderr, /never in sync/);
      ok('promote --force', sites.promote(s, true));
      await writeApart(sites, s, [0], 0x44);
      const h = await hashes(sites);
      await sites.startSecondary(s);
      await sites.startPrimary(p);
      await bothDecide(sites, p, s, 'unrelated');
      assert.deepEqual(await hashes(sites), h, 'nothing written by the refused handshake');
      await sites.stop(s);
      ok('create --force', recreate(sites, s));
      await sites.startSecondary(s);
      await sites.waitDecision(p, 'fullSync', 'the re-created replica');
      await sites.waitInSync(p, 'the full sync');
      await sites.assertIdentical('after the full sync');
    });
  });
}
