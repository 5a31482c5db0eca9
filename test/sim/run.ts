/**
 * Runs simulation seeds and reports: the shared core of `npm run sim` (main.ts) and of the CI
 * test (sim.test.ts). A failing seed prints its kind, what broke, the last steps of its trace
 * and the command that replays it exactly.
 */
import { SimFailure, type SimStats, World } from './world.js';

export const DEFAULT_STEPS = 400;

export interface SeedResult {
  seed: number;
  ok: boolean;
  kind?: SimFailure['kind'];
  message?: string;
  trace?: string;
  describe: string;
  stats: SimStats;
}

export interface RunTotals {
  seeds: number;
  failed: SeedResult[];
  seconds: number;
  steps: number;
  requests: number;
  kills: number;
  powerLosses: number;
  linkFaults: number;
  writebacks: number;
}

let current: World | undefined;
let stray: Error | undefined;
/** Code under test that throws outside any step (a rejected promise nobody awaited) fails the seed. */
function onStray(err: unknown): void {
  stray ??= err instanceof Error ? err : new Error(String(err));
}

export async function runSeed(seed: number, steps = DEFAULT_STEPS): Promise<SeedResult> {
  const world = new World({ seed, steps });
  current = world;
  stray = undefined;
  process.on('unhandledRejection', onStray);
  process.on('uncaughtException', onStray);
  try {
    await world.run();
    const leaked = stray as Error | undefined;
    if (leaked) throw new SimFailure('crash', `unhandled error: ${leaked.stack}`);
    return { seed, ok: true, describe: world.describe(), stats: world.stats };
  } catch (err) {
    const failure =
      err instanceof SimFailure
        ? err
        : new SimFailure('crash', `the code under test threw: ${(err as Error).stack ?? String(err)}`);
    return {
      seed,
      ok: false,
      kind: failure.kind,
      message: failure.message,
      trace: world.recentTrace(),
      describe: world.describe(),
      stats: world.stats,
    };
  } finally {
    process.off('unhandledRejection', onStray);
    process.off('uncaughtException', onStray);
    current = undefined;
  }
}

/** Seeds `first .. first + count - 1`; stops at the first failure if `untilFail`. */
export async function runSeeds(
  first: number,
  count: number,
  options: { steps?: number; untilFail?: boolean; onResult?: (r: SeedResult) => void } = {},
): Promise<RunTotals> {
  const started = performance.now();
  const totals: RunTotals = {
    seeds: 0,
    failed: [],
    seconds: 0,
    steps: 0,
    requests: 0,
    kills: 0,
    powerLosses: 0,
    linkFaults: 0,
    writebacks: 0,
  };
  for (let seed = first; seed < first + count; seed++) {
    const r = await runSeed(seed, options.steps);
    totals.seeds += 1;
    totals.steps += r.stats.steps;
    totals.requests += r.stats.requests;
    totals.kills += r.stats.kills;
    totals.powerLosses += r.stats.powerLosses;
    totals.linkFaults += r.stats.linkFaults;
    totals.writebacks += r.stats.writebacks;
    options.onResult?.(r);
    if (!r.ok) {
      totals.failed.push(r);
      if (options.untilFail) break;
    }
  }
  totals.seconds = (performance.now() - started) / 1000;
  return totals;
}

export function formatFailure(r: SeedResult, steps = DEFAULT_STEPS): string {
  const replay = `npm run sim -- --seed ${r.seed}${steps === DEFAULT_STEPS ? '' : ` --steps ${steps}`}`;
  return [
    `simulation FAILED (${r.kind}): ${r.describe}`,
    `  ${r.message}`,
    `last steps (step, simulated time, event):`,
    r.trace ?? '',
    `replay: ${replay}`,
  ].join('\n');
}

export function formatTotals(t: RunTotals): string {
  return (
    `${t.seeds} seeds in ${t.seconds.toFixed(1)} s (${(t.seeds / t.seconds).toFixed(1)} seeds/s), ` +
    `${t.steps} steps, ${t.requests} client requests, ${t.kills} process kills, ${t.powerLosses} power losses, ` +
    `${t.linkFaults} link faults, ${t.writebacks} kernel writebacks; ${t.failed.length} failed`
  );
}

/** For debugging from a REPL: the world of the seed running now. */
export function currentWorld(): World | undefined {
  return current;
}
