/**
 * `npm run sim`: the seeded simulator of the whole pair (see world.ts).
 *
 *   npm run sim -- --seed 42            one seed, replayed exactly, with its trace on failure
 *   npm run sim -- --seeds 1000         seeds 1..1000 (--first F to start elsewhere)
 *   npm run sim -- --seeds 100000 --jobs 2   the same, split over two processes
 *   npm run sim -- --until-fail         stop at the first failing seed (how many seeds it took)
 *   --steps N                           random steps per seed before healing (default 300)
 *
 * Exit code: 0 all seeds passed, 1 a correctness check failed, 2 liveness (the pair did not
 * converge), 3 the code under test threw.
 */
import { fork } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { DEFAULT_STEPS, formatFailure, formatTotals, type RunTotals, runSeed, runSeeds } from './run.js';

const EXIT = { correctness: 1, liveness: 2, crash: 3 } as const;

function parse(argv: string[]): Record<string, string | boolean> {
  const out: Record<string, string | boolean> = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith('--')) throw new Error(`unexpected argument ${a}`);
    const key = a.slice(2);
    if (key === 'until-fail' || key === 'quiet' || key === 'worker') out[key] = true;
    else out[key] = argv[++i] ?? '';
  }
  return out;
}

function int(v: string | boolean | undefined, what: string, fallback: number): number {
  if (v === undefined) return fallback;
  const n = Number(v);
  if (!Number.isSafeInteger(n) || n < 0) {
    process.stderr.write(`sim: --${what} wants a whole number, got ${String(v)}\n`);
    process.exit(64);
  }
  return n;
}

async function main(): Promise<void> {
  const args = parse(process.argv.slice(2));
  const steps = int(args.steps, 'steps', DEFAULT_STEPS);
  if (args.seed !== undefined) {
    const r = await runSeed(int(args.seed, 'seed', 1), steps);
    if (r.ok) {
      process.stdout.write(`seed ${r.seed} passed: ${r.describe}; ${JSON.stringify(r.stats)}\n`);
      return;
    }
    process.stdout.write(`${formatFailure(r, steps)}\n`);
    process.exit(EXIT[r.kind!]);
  }
  const first = int(args.first, 'first', 1);
  const count = int(args.seeds, 'seeds', 200);
  const jobs = Math.max(1, int(args.jobs, 'jobs', 1));
  const untilFail = args['until-fail'] === true;
  let totals: RunTotals;
  if (jobs > 1) {
    totals = await runInWorkers(first, count, jobs, steps, untilFail);
  } else {
    totals = await runSeeds(first, count, {
      steps,
      untilFail,
      onResult: (r) => {
        if (!r.ok) process.stdout.write(`${formatFailure(r, steps)}\n`);
        else if (!args.quiet && r.seed % 1000 === 0) process.stderr.write(`... seed ${r.seed}\n`);
      },
    });
  }
  if (args.worker) {
    process.send?.(totals);
    return;
  }
  process.stdout.write(`${formatTotals(totals)}\n`);
  if (untilFail && totals.failed.length > 0)
    process.stdout.write(`first failure after ${totals.seeds} seed(s)\n`);
  const worst = totals.failed[0];
  if (worst) process.exit(EXIT[worst.kind!]);
}

/** Splits the seeds over processes (two cores: the 100,000-seed run). */
async function runInWorkers(
  first: number,
  count: number,
  jobs: number,
  steps: number,
  untilFail: boolean,
): Promise<RunTotals> {
  const per = Math.ceil(count / jobs);
  const script = fileURLToPath(import.meta.url);
  const parts = await Promise.all(
    Array.from({ length: jobs }, (_, j) => {
      const from = first + j * per;
      const n = Math.max(0, Math.min(per, first + count - from));
      const args = [
        '--first',
        String(from),
        '--seeds',
        String(n),
        '--steps',
        String(steps),
        '--worker',
        '--quiet',
      ];
      if (untilFail) args.push('--until-fail');
      return new Promise<RunTotals>((resolve, reject) => {
        const child = fork(script, args, {
          execArgv: process.execArgv,
          stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
        });
        let result: RunTotals | undefined;
        child.on('message', (m) => (result = m as RunTotals));
        child.on('exit', (code) =>
          result ? resolve(result) : reject(new Error(`worker exited with ${code}`)),
        );
      });
    }),
  );
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
  for (const p of parts) {
    for (const k of [
      'seeds',
      'steps',
      'requests',
      'kills',
      'powerLosses',
      'linkFaults',
      'writebacks',
    ] as const)
      totals[k] += p[k];
    totals.seconds = Math.max(totals.seconds, p.seconds);
    totals.failed.push(...p.failed);
  }
  return totals;
}

main().catch((err: unknown) => {
  process.stderr.write(`sim: ${(err as Error).stack ?? String(err)}\n`);
  process.exit(3);
});
