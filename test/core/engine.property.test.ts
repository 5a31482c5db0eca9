/**
 * Property tests of the engine core against the reference world in harness.ts: random
 * schedules of concurrent (overlapping) writes, log syncs, volume completions in any order,
 * replica applies and cumulative acks, timeouts, disconnects, bitmap checkpoints, resyncs and
 * power losses. After every step: I1, I2, I3, H8, H9, H10, H14; at the end, liveness.
 *
 * VOLREP_SEED=<n> replays a run; VOLREP_RUNS=<n> changes the number of runs.
 */
import { describe, it } from 'node:test';
import fc from 'fast-check';
import type { EngineConfig } from '../../src/core/engine.js';
import { runSteps, STEP_KINDS, type Step } from './schedule.js';

const seed = process.env.VOLREP_SEED ? Number(process.env.VOLREP_SEED) : undefined;
const numRuns = process.env.VOLREP_RUNS ? Number(process.env.VOLREP_RUNS) : 1000;

const step = fc.tuple(fc.nat({ max: STEP_KINDS - 1 }), fc.nat(), fc.nat()) as fc.Arbitrary<Step>;

function check(config: EngineConfig, maxSteps: number, runs = numRuns): void {
  fc.assert(
    fc.property(fc.array(step, { maxLength: maxSteps, size: 'max' }), (steps) => {
      runSteps(config, steps);
    }),
    { seed, numRuns: runs, includeErrorInReport: true },
  );
}

const small: EngineConfig = {
  volumeSize: 5 * 4096,
  regionSize: 4096,
  logCapacity: 1024,
  activityWindowRegions: 2,
  inflightBytesMax: 16 * 1024,
  ackTimeoutMs: 1000,
  txWritesMax: 2,
};

describe('engine core properties (I1, I2, I3, H8-H10, H14, liveness)', () => {
  it('holds on a tiny volume with a tiny log and window', () => {
    check(small, 120);
  });

  it('holds with one region, single-write transactions (hot contention)', () => {
    check({ ...small, volumeSize: 4096, txWritesMax: 1, activityWindowRegions: 1 }, 120);
  });

  it('holds with a roomy window and log (hot regions skip logging)', () => {
    check({ ...small, volumeSize: 6 * 4096, logCapacity: 64 * 1024, activityWindowRegions: 8 }, 150);
  });

  it('holds with a tight in-flight window (backpressure)', () => {
    check({ ...small, inflightBytesMax: 1024 }, 120);
  });

  it('holds when finished volume writes are durable at once (no volume syncs)', () => {
    check({ ...small, volumeWritesDurable: true, activityWindowRegions: 3 }, 150);
  });
});
