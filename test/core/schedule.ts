/** Interprets a list of random numbers as a schedule of events on the reference world. */
import type { EngineConfig, WriteKind } from '../../src/core/engine.js';
import { SECTOR_BYTES, World } from './harness.js';

const KINDS: WriteKind[] = ['data', 'data', 'zero', 'trim'];

/** Kinds of steps a number picks from (weights by repetition). */
export const STEP_KINDS = 21;

export type Step = [op: number, a: number, b: number];

export function runSteps(config: EngineConfig, steps: Step[]): void {
  const w = new World(config);
  const sectors = config.volumeSize / SECTOR_BYTES;
  const perRegion = config.regionSize / SECTOR_BYTES;
  try {
    for (const [op, a, b] of steps) {
      switch (op % STEP_KINDS) {
        case 0:
        case 1:
        case 2:
        case 3: {
          const n = 1 + (b % (config.txWritesMax ?? 1));
          const writes = [];
          for (let i = 0; i < n; i++) {
            writes.push({
              sector: (a + i * 7) % sectors,
              sectors: 1 + ((b >>> (4 + i)) % (perRegion + 4)),
              kind: KINDS[(a >>> 8) % KINDS.length],
            });
          }
          w.submit(writes);
          break;
        }
        case 4:
        case 5:
          w.syncLog();
          break;
        case 6:
        case 7:
        case 8:
          w.finishWrite(a);
          break;
        case 9:
          w.finishRead(a);
          break;
        case 10:
        case 11:
          w.apply();
          break;
        case 12:
        case 13:
          w.ack();
          break;
        case 14:
          if (a % 6 === 0) w.disconnect();
          else w.connect();
          break;
        case 15:
          w.persistBitmap();
          break;
        case 16:
          // Mostly short ticks; now and then one beyond the ack timeout.
          w.tick(a % 8 === 0 ? b % 3000 : b % 300);
          break;
        case 17:
          if (a % 3 === 0) w.checkpoint();
          else w.persistBitmap();
          break;
        case 18:
          if (a % 4 === 0) w.crash({ prefix: b, bitmapLanded: (b & 1) === 1, writesLanded: a >>> 2 });
          else w.syncLog();
          break;
        case 19:
          w.apply();
          w.ack();
          break;
        case 20:
          if (a % 2 === 0) w.syncVolume();
          else w.barrier();
          break;
      }
    }
    w.quiesce();
  } catch (err) {
    // The schedule as the engine saw it goes into the message fast-check prints for the
    // shrunk counterexample (with the seed that replays it).
    if (process.env.VOLREP_TRACE) console.error(w.log.join('\n'));
    if (err instanceof Error)
      err.message += `\ntrace (${w.log.length} events):\n  ${w.log.slice(-60).join('\n  ')}`;
    throw err;
  }
}
