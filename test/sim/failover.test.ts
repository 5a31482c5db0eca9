/**
 * CI's share of the failover simulator (test/sim/failover.ts): seeds 1..N of two sites changing
 * roles under crashes, power losses and link faults, every handshake judged against the ground
 * truth, every run converging to identical volumes. VOLREP_FAILOVER_SEEDS sets N.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { runFailoverSeeds } from './failover.js';

const SEEDS = Number(process.env.VOLREP_FAILOVER_SEEDS ?? 1500);

test(`failover simulator: ${SEEDS} seeds, every handshake judged, every run converges`, {
  timeout: 600_000,
}, async () => {
  const r = await runFailoverSeeds(1, SEEDS);
  console.log(
    `${SEEDS} failover seeds in ${r.seconds.toFixed(1)} s: ${r.roleChanges} role changes, decisions ${JSON.stringify(r.decisions)}`,
  );
  const first = r.failed[0];
  assert.equal(
    r.failed.length,
    0,
    first &&
      `seed ${first.seed}: ${first.message}\n${first.trace}\nreplay: npm run sim:failover -- --seed ${first.seed}`,
  );
  for (const d of ['resync', 'fullSync', 'splitBrain', 'peerNewer', 'unrelated', 'fullOnRequest'])
    assert.ok((r.decisions as Record<string, number>)[d] > 0, `no ${d} decision was exercised`);
});
