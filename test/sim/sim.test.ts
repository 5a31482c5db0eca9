/**
 * The seeded simulator in CI: a fixed range of seeds (VOLREP_SIM_SEEDS to change how many,
 * VOLREP_SEED to run one). A failure prints the seed, what broke, the last steps of its trace
 * and the command that replays it (`npm run sim -- --seed S`).
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { formatFailure, formatTotals, runSeeds } from './run.js';

const SEEDS = Number(process.env.VOLREP_SIM_SEEDS ?? 2500);

describe('simulation of the pair under power loss, process kills and link faults', () => {
  it(`holds every invariant at every step and converges (${SEEDS} seeds)`, {
    timeout: 600_000,
  }, async (t) => {
    const one = process.env.VOLREP_SEED;
    const totals = one ? await runSeeds(Number(one), 1) : await runSeeds(1, SEEDS);
    t.diagnostic(formatTotals(totals));
    const failed = totals.failed[0];
    if (failed) assert.fail(formatFailure(failed));
    // The schedule must reach the interesting places, or the run proves little.
    assert.ok(totals.powerLosses >= totals.seeds, `only ${totals.powerLosses} power losses`);
    assert.ok(totals.kills >= totals.seeds, `only ${totals.kills} process kills`);
    assert.ok(totals.linkFaults >= totals.seeds, `only ${totals.linkFaults} link faults`);
  });
});
