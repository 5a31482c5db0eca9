/**
 * --mode sync: a write is acknowledged to the NBD client only once the secondary has written it
 * (and made it durable, for FUA and FLUSH: the simulator checks that part). Real `volrep primary`
 * and `volrep secondary` processes, volrep's own NBD client.
 *
 * The gate: with the secondary frozen (SIGSTOP) and an --ack-timeout long enough that the link is
 * not dropped, writes must stay unacknowledged (they are on the primary's volume, pending on the
 * link); after SIGCONT they complete, and the moment each completes its data is in the replica
 * file. With --mode async (or without the gate in the engine) they complete at once, so this
 * fails; the async control below shows the freeze by itself does not hold writes back.
 *
 * Durability of what completed: SIGKILL of the primary in the same turn as an acknowledgement;
 * the data must already be in the replica file (read directly, then and after the kill).
 */
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { after, describe, it } from 'node:test';
import { NbdClient } from '../../src/nbd/client.js';
import { readRange, waitFor } from '../helpers/clients.js';
import { Prng } from '../sim/prng.js';
import { Pair, prngBytes, rounds, testSeed } from './pair.js';

const SIZE = 16 * 1024 * 1024;
const SEED = testSeed('sync-mode.test.ts');
const GATE_ROUNDS = rounds(3);
const KILL_ROUNDS = rounds(8);
/** How long writes must stay unacknowledged while the secondary is frozen. */
const HOLD_MS = 1500;
/** How long they may take once it runs again. */
const RESUME_MS = 5000;
/** Far longer than the test: a frozen secondary must not get the link dropped. */
const ACK_TIMEOUT = '20s';

interface Write {
  offset: number;
  data: Buffer;
}

/** `count` writes of 1 byte to 256 KiB at random offsets, in disjoint slices of the volume. */
function disjointWrites(prng: Prng, count: number): Write[] {
  const slice = Math.floor(SIZE / count);
  const writes: Write[] = [];
  for (let i = 0; i < count; i++) {
    const length = 1 + prng.int(256 * 1024);
    writes.push({ offset: i * slice + prng.int(slice - length), data: prngBytes(prng, length) });
  }
  return writes;
}

/** The first offset where `got` differs from `want`, or -1. */
function firstDifference(got: Buffer, want: Buffer): number {
  for (let b = 0; b < want.length; b++) if (got[b] !== want[b]) return b;
  return -1;
}

/** Linux process state letter from /proc (T = stopped), or undefined where there is no /proc. */
function processState(pid: number): string | undefined {
  const file = `/proc/${pid}/stat`;
  if (!existsSync(file)) return undefined;
  const stat = readFileSync(file, 'utf8');
  return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
}

/** SIGSTOP/SIGCONT of the secondary; `resume` is idempotent, for finally blocks. */
class Freezer {
  private frozen = false;
  constructor(private readonly pair: Pair) {}

  async freeze(): Promise<void> {
    const child = this.pair.secondary!.child;
    assert.ok(child.kill('SIGSTOP'), 'SIGSTOP of the secondary');
    this.frozen = true;
    if (processState(child.pid!) === undefined) return;
    await waitFor(() => processState(child.pid!) === 'T', 'the secondary to be stopped', 2000, 5);
  }

  resume(): void {
    if (!this.frozen) return;
    this.frozen = false;
    this.pair.secondary?.child.kill('SIGCONT');
  }
}

interface Issued extends Write {
  done: boolean;
  error?: Error;
  /** When the write completed (performance.now()). */
  doneAtMs?: number;
  /** The replica file's bytes read in the same turn as the acknowledgement. */
  onReplicaAtAck?: Buffer;
  promise: Promise<void>;
}

/** Issues the writes pipelined, recording for each when it completed and what the replica held then. */
function issue(client: NbdClient, replica: string, writes: Write[]): Issued[] {
  return writes.map((w) => {
    const issued: Issued = { ...w, done: false, promise: Promise.resolve() };
    issued.promise = client.write(w.offset, w.data).then(
      () => {
        issued.onReplicaAtAck = readRange(replica, w.offset, w.data.length);
        issued.doneAtMs = performance.now();
        issued.done = true;
      },
      (err: Error) => {
        issued.error = err;
        issued.doneAtMs = performance.now();
        issued.done = true;
      },
    );
    return issued;
  });
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
const describeWrite = (w: Write) => `write of ${w.data.length} bytes at ${w.offset}`;

describe('--mode sync: acknowledged means on the replica', { timeout: 120_000 }, () => {
  const pairs: Pair[] = [];
  after(async () => {
    for (const pair of pairs) await pair.cleanup();
  });

  it(`a write waits for the secondary's ack: frozen secondary, ${GATE_ROUNDS} rounds, seed ${SEED}`, async () => {
    const prng = new Prng(SEED);
    const pair = new Pair({ size: '16M', primaryExtra: ['--mode', 'sync', '--ack-timeout', ACK_TIMEOUT] });
    pairs.push(pair);
    await pair.start();
    await pair.waitInSync('before the first round');
    const { host, port } = pair.primary!.nbd;
    const client = await NbdClient.connect(host, port, 'volrep');
    const freezer = new Freezer(pair);
    try {
      for (let round = 1; round <= GATE_ROUNDS; round++) {
        const what = `round ${round} seed ${SEED}`;
        await pair.waitInSync(`${what}: before the freeze`);
        const writes = disjointWrites(prng, 1 + prng.int(4));
        await freezer.freeze();
        const acksBefore = await pair.primaryMetric('volrep_acks_total');
        const issued = issue(client, pair.secondaryVolume, writes);
        const issuedAt = performance.now();
        // Resume before describing the pair: a frozen secondary does not answer /status.
        const fail = async (message: string): Promise<never> => {
          freezer.resume();
          assert.fail(`${what}: ${message}\n${await pair.describe()}`);
        };

        // Frozen: every write is on the primary's volume, its update pending on the link, and
        // none is acknowledged.
        try {
          await waitFor(
            () => writes.every((w) => readRange(pair.primaryVolume, w.offset, w.data.length).equals(w.data)),
            'the writes on the primary volume',
            HOLD_MS,
            20,
          );
        } catch (err) {
          await fail(`while the secondary is frozen: ${(err as Error).message}`);
        }
        await sleep(Math.max(0, HOLD_MS - (performance.now() - issuedAt)));
        const early = issued.filter((w) => w.done);
        if (early.length > 0) {
          await fail(
            `${early.length} of ${issued.length} writes completed while the secondary was frozen: ` +
              early
                .map(
                  (w) =>
                    `${describeWrite(w)} after ${Math.round(w.doneAtMs! - issuedAt)} ms` +
                    (w.error ? ` (failed: ${w.error.message})` : ''),
                )
                .join(', '),
          );
        }
        const status = await pair.primaryStatus();
        if (status.peer?.state !== 'connected' || !(status.pendingUpdates > 0)) {
          await fail(
            `while frozen the link must stay up with updates pending: peer state ${status.peer?.state}, ` +
              `pendingUpdates ${status.pendingUpdates}`,
          );
        }
        const pendingGauge = await pair.primaryMetric('volrep_pending_updates');
        const acksFrozen = await pair.primaryMetric('volrep_acks_total');
        if (!(pendingGauge > 0) || acksFrozen !== acksBefore) {
          await fail(
            `while frozen: volrep_pending_updates ${pendingGauge} (want > 0), volrep_acks_total ` +
              `${acksBefore} → ${acksFrozen} (want unchanged)`,
          );
        }
        for (const w of writes) {
          if (readRange(pair.secondaryVolume, w.offset, w.data.length).equals(w.data)) {
            await fail(`${describeWrite(w)} is on the replica although the secondary is frozen`);
          }
        }

        // Running again: every write completes soon, and had reached the replica when it did.
        const resumedAt = performance.now();
        freezer.resume();
        const all = Promise.all(issued.map((w) => w.promise));
        const timedOut = await Promise.race([all.then(() => false), sleep(RESUME_MS).then(() => true)]);
        if (timedOut) {
          const waiting = issued.filter((w) => !w.done).map(describeWrite);
          await fail(`after SIGCONT, ${waiting.join(', ')} not completed within ${RESUME_MS} ms`);
        }
        for (const w of issued) {
          if (w.error) await fail(`${describeWrite(w)} failed after SIGCONT: ${w.error.message}`);
          const diff = firstDifference(w.onReplicaAtAck!, w.data);
          if (diff >= 0) {
            await fail(
              `${describeWrite(w)} was acknowledged before it was on the replica ` +
                `(first difference at byte ${w.offset + diff})`,
            );
          }
        }
        const latest = Math.max(...issued.map((w) => w.doneAtMs!));
        console.log(
          `${what}: ${issued.length} writes held ${HOLD_MS} ms while frozen, completed ` +
            `${Math.round(latest - resumedAt)} ms after SIGCONT`,
        );
      }
    } finally {
      freezer.resume();
    }
    await client.close();
    await pair.waitInSync('after the last round');
    await pair.assertIdentical('after the last round');
  });

  it('control: with --mode async the same write completes while the secondary is frozen', async () => {
    const prng = new Prng(SEED ^ 0x5a5a5a5a);
    const pair = new Pair({ size: '16M', primaryExtra: ['--mode', 'async', '--ack-timeout', ACK_TIMEOUT] });
    pairs.push(pair);
    await pair.start();
    await pair.waitInSync('async control: before the freeze');
    const { host, port } = pair.primary!.nbd;
    const client = await NbdClient.connect(host, port, 'volrep');
    const freezer = new Freezer(pair);
    try {
      await freezer.freeze();
      const [w] = issue(client, pair.secondaryVolume, disjointWrites(prng, 1));
      const issuedAt = performance.now();
      await Promise.race([w.promise, sleep(HOLD_MS)]);
      assert.ok(
        w.done && !w.error,
        `async control: ${describeWrite(w)} did not complete within ${HOLD_MS} ms with the secondary ` +
          `frozen (${w.error?.message ?? 'still pending'}): the freeze holds writes back by itself, so ` +
          'the sync test would prove nothing',
      );
      console.log(
        `async control: completed ${Math.round(w.doneAtMs! - issuedAt)} ms after issue while frozen`,
      );
    } finally {
      freezer.resume();
    }
    await client.close();
    await pair.waitInSync('async control: after SIGCONT');
    await pair.assertIdentical('async control: after SIGCONT');
  });

  it(`SIGKILL of the primary right after each acknowledged write (${KILL_ROUNDS} rounds, seed ${SEED})`, async () => {
    const prng = new Prng(SEED ^ 0xa5a5a5a5);
    const pair = new Pair({ size: '16M', primaryExtra: ['--mode', 'sync'] });
    pairs.push(pair);
    await pair.start();
    for (let round = 1; round <= KILL_ROUNDS; round++) {
      const what = `round ${round} seed ${SEED}`;
      if (!pair.primary) await pair.startPrimary();
      await pair.waitInSync(`${what}: before the write`);
      const { host, port } = pair.primary!.nbd;
      const client = await NbdClient.connect(host, port, 'volrep');
      // A few writes acknowledged normally, then the one the primary dies on.
      const writes: Write[] = [];
      const count = 1 + prng.int(4);
      for (let i = 0; i < count; i++) {
        const length = 1 + prng.int(256 * 1024);
        writes.push({ offset: prng.int(SIZE - length), data: prngBytes(prng, length) });
      }
      const child = pair.primary!.child;
      const atAck: Buffer[] = [];
      for (let i = 0; i < count; i++) {
        await client.write(writes[i].offset, writes[i].data);
        if (i === count - 1) child.kill('SIGKILL'); // in the same turn as the acknowledgement
        atAck.push(readRange(pair.secondaryVolume, writes[i].offset, writes[i].data.length));
      }
      await pair.killPrimary();
      // In the same turn as its acknowledgement each write was on the replica as written; after
      // the kill, later writes may overwrite earlier ones: compare against the last write of each byte.
      for (let i = 0; i < count; i++) {
        const diff = firstDifference(atAck[i], writes[i].data);
        if (diff >= 0) {
          assert.fail(
            `${what}: ${describeWrite(writes[i])} was acknowledged before it was on the replica ` +
              `(first difference at byte ${writes[i].offset + diff})\n${await pair.describe()}`,
          );
        }
      }
      const expected = new Map<number, number>();
      for (const w of writes) for (let b = 0; b < w.data.length; b++) expected.set(w.offset + b, w.data[b]);
      for (const w of writes) {
        const onReplica = readRange(pair.secondaryVolume, w.offset, w.data.length);
        for (let b = 0; b < w.data.length; b++) {
          if (onReplica[b] !== expected.get(w.offset + b)) {
            assert.fail(
              `${what}: acknowledged ${describeWrite(w)} is not on the replica after the kill ` +
                `(first difference at byte ${w.offset + b})\n${await pair.describe()}`,
            );
          }
        }
      }
    }
    await pair.startPrimary();
    await pair.waitInSync('after the last round');
    await pair.assertIdentical('after the last round');
  });
});
