/**
 * Process-level crash test of the standalone primary (no secondary): round after round, NBD
 * clients write to the volume (volrep's own client, whose acknowledgements we see exactly, and a
 * `qemu-io` process), the primary is killed with SIGKILL at a random moment mid-write and
 * restarted, and GET /dirty must then show
 *   (a) every region touched by a write acknowledged before any kill, and
 *   (b) no region that no write (acknowledged or in flight) ever targeted;
 * and the volume file must hold the bytes of every acknowledged write that no later or
 * concurrent write may have overwritten.
 *
 * The volume has 64 KiB regions and the smallest log (64 KiB: about a thousand begin records).
 * Dirty regions stay in the activity window until a checkpoint, so a session appends one record
 * per newly written region: "scatter" rounds write to more distinct regions (of the volume's
 * first half) than the log holds, which forces log-full folding into the bitmap, and over the
 * rounds the circular log wraps many times. "Hot" rounds write around a few random spots of the
 * whole volume, so most of the second half is never targeted and (b) keeps its teeth.
 *
 * Seeded: the seed is printed; VOLREP_SEED=<n> replays the same choices (the kill moments are
 * timing, so a replay is close, not exact).
 */
import assert from 'node:assert/strict';
import { randomInt } from 'node:crypto';
import { closeSync, openSync, readSync } from 'node:fs';
import { after, before, describe, it } from 'node:test';
import { NbdClient } from '../../src/nbd/client.js';
import { createVolumeCli, httpRequest, metricValue, type RunResult, run } from '../helpers/clients.js';
import { type Daemon, needTool, startPrimary, tempDir } from '../helpers/daemon.js';
import { Prng } from '../sim/prng.js';

const K = 1024;
const M = 1024 * K;
const SECTOR = 512;
const REGION = 64 * K;
const SIZE = 256 * M;
const REGIONS = SIZE / REGION;
const SECTORS = SIZE / SECTOR;
/** Scatter rounds write only here (the first half), so the second half stays mostly untargeted. */
const SCATTER_REGIONS = REGIONS / 2;
const ROUNDS = 22;
const SEED = process.env.VOLREP_SEED !== undefined ? Number(process.env.VOLREP_SEED) : randomInt(2 ** 31);

/** Sector states in the content model. */
const NEVER = -2;
const UNKNOWN = -1;

type Kind = 'data' | 'zero' | 'trim';

interface Write {
  id: number;
  round: number;
  /** 'nbd' (volrep's client; one clock for all its connections) or 'qemu<round>'. */
  source: string;
  /** Position in its qemu-io script. */
  index: number;
  kind: Kind;
  offset: number;
  length: number;
  /** qemu-io's -P byte; volrep's client writes stamped sectors instead. */
  pattern: number;
  submit: number;
  /** Clock value when the client saw the reply; undefined if never acknowledged. */
  ack?: number;
}

interface RoundStats {
  round: number;
  type: 'hot' | 'scatter';
  submitted: number;
  acked: number;
  qemuAcked: number;
  killAfterMs: number;
  stalled: boolean;
  logRecords?: number;
  logSyncs?: number;
  bitmapPersists?: number;
  logUsed?: number;
}

function regionsOf(offset: number, length: number): [number, number] {
  return [Math.floor(offset / REGION), Math.floor((offset + length - 1) / REGION)];
}

/** The bytes volrep's client writes into sector `abs` for write `id`: recognisable anywhere. */
function stampSector(buf: Buffer, at: number, id: number, abs: number): void {
  buf.fill((id * 131 + abs * 7 + 1) & 0xff, at, at + SECTOR);
  buf.writeUInt32LE(id, at);
  buf.writeUInt32LE(abs, at + 4);
  buf.writeUInt32LE(0x564f4c52, at + 8); // 'VOLR'
}

function dataFor(w: Write): Buffer {
  const buf = Buffer.allocUnsafe(w.length);
  const first = w.offset / SECTOR;
  for (let j = 0; j < w.length / SECTOR; j++) stampSector(buf, j * SECTOR, w.id, first + j);
  return buf;
}

const ZERO_SECTOR = Buffer.alloc(SECTOR);

async function getDirty(daemon: Daemon): Promise<Set<number>> {
  const r = await httpRequest(daemon.http!, '/dirty');
  assert.equal(r.status, 200, r.body);
  const d = JSON.parse(r.body) as { regionSize: number; ranges: [number, number][] };
  assert.equal(d.regionSize, REGION);
  const out = new Set<number>();
  for (const [a, b] of d.ranges) {
    assert.ok(Number.isInteger(a) && Number.isInteger(b) && a <= b && b < REGIONS, JSON.stringify([a, b]));
    for (let r = a; r <= b; r++) out.add(r);
  }
  return out;
}

function fmtRegions(list: number[], max = 20): string {
  const sorted = [...list].sort((a, b) => a - b);
  return `${sorted.slice(0, max).join(', ')}${sorted.length > max ? `, ... (${sorted.length})` : ''}`;
}

describe('standalone primary: SIGKILL mid-write, restart, dirty set and data', () => {
  const skip = needTool('qemu-io', 'qemu-utils');
  const tmp = tempDir('volrep-crash-');
  let volume = '';
  let daemon: Daemon | undefined;
  const rng = new Prng(SEED);
  const writes: Write[] = [];
  /** Regions of writes acknowledged to a client, and of every write that may have reached the server. */
  const ackedRegions = new Set<number>();
  const targetedRegions = new Set<number>();
  /** Per sector: NEVER, UNKNOWN, or the id of the write whose bytes it must hold. */
  const sectorState = new Int32Array(SECTORS).fill(NEVER);
  const stats: RoundStats[] = [];
  let clock = 0;
  let logCapacity = 0;

  before(() => {
    if (skip) return;
    process.stdout.write(`# crash test seed: VOLREP_SEED=${SEED}\n`);
    volume = createVolumeCli(tmp.dir, 'crash.img', '256M', ['--region-size', '64K', '--log-size', '64K']);
  });
  after(async () => {
    await daemon?.kill();
    tmp.cleanup();
  });

  /** A random request somewhere around region `center` (often across a region boundary). */
  function randomOp(center: number): { kind: Kind; offset: number; length: number } {
    const lengths = [SECTOR, 4 * K, 4 * K, 4 * K, 8 * K, 12 * K + SECTOR, 16 * K, 32 * K, 64 * K, 96 * K];
    const length = rng.pick(lengths);
    let offset: number;
    if (rng.chance(0.3)) {
      // Straddle a boundary of the center region.
      const boundary = (center + rng.int(2)) * REGION;
      offset = boundary - (1 + rng.int(Math.max(1, length / SECTOR - 1))) * SECTOR;
    } else {
      offset = center * REGION + (rng.int((2 * REGION) / SECTOR) - REGION / SECTOR / 2) * SECTOR;
    }
    offset = Math.min(Math.max(0, offset), SIZE - length);
    const k = rng.int(100);
    const kind: Kind = k < 70 ? 'data' : k < 85 ? 'zero' : 'trim';
    return { kind, offset, length };
  }

  function newWrite(
    round: number,
    source: string,
    index: number,
    op: { kind: Kind; offset: number; length: number },
  ): Write {
    const w: Write = { id: writes.length, round, source, index, ...op, pattern: 1 + rng.int(255), submit: 0 };
    writes.push(w);
    return w;
  }

  /** Runs requests from `next()` at queue depth `depth` on `client` until one fails or `stop()`. */
  async function drive(
    client: NbdClient,
    depth: number,
    next: () => Write | undefined,
    stop: () => boolean,
    onAck: () => void,
  ): Promise<void> {
    let failed = false;
    const worker = async () => {
      while (!failed && !stop()) {
        const w = next();
        if (!w) return;
        w.submit = ++clock;
        try {
          if (w.kind === 'data') await client.write(w.offset, dataFor(w), rng.chance(0.05));
          else if (w.kind === 'zero') await client.writeZeroes(w.offset, w.length);
          else await client.trim(w.offset, w.length);
          w.ack = ++clock;
          onAck();
          if (rng.chance(0.01)) await client.flush();
        } catch {
          failed = true;
        }
      }
    };
    await Promise.all(Array.from({ length: depth }, worker));
  }

  /** Parses qemu-io's output: how many of its commands (a prefix) were acknowledged. */
  function qemuAcked(r: RunResult, script: Write[]): number {
    let n = 0;
    for (const line of r.stdout.split('\n')) {
      if (line.includes('ops;') || line.trim() === '') continue;
      const m = /^(wrote|discard) (\d+)\/(\d+) bytes at offset (\d+)/.exec(line);
      if (!m) break; // "write failed: ..." and everything after it
      const w = script[n];
      assert.ok(w, `qemu-io reported more commands than it was given:\n${r.stdout}`);
      assert.equal(Number(m[4]), w.offset, `qemu-io output out of step at command ${n}`);
      assert.equal(Number(m[2]), w.length);
      n++;
    }
    return n;
  }

  function qemuCommand(w: Write): string {
    if (w.kind === 'data') return `write -P ${w.pattern} ${w.offset} ${w.length}`;
    if (w.kind === 'zero') return `write -z ${w.offset} ${w.length}`;
    return `discard ${w.offset} ${w.length}`;
  }

  /** x certainly reached the volume before w was issued. */
  function landedBefore(x: Write, w: Write): boolean {
    if (x.round !== w.round) return x.round < w.round;
    if (x.source === 'nbd' && w.source === 'nbd') return x.ack !== undefined && x.ack < w.submit;
    if (x.source === w.source) return x.index < w.index;
    return false;
  }

  /** Folds one round's requests into the model: regions acked/targeted and each sector's expected content. */
  function resolveRound(round: Write[]): void {
    const touching = new Map<number, Write[]>();
    for (const w of round) {
      const [a, b] = regionsOf(w.offset, w.length);
      for (let r = a; r <= b; r++) {
        targetedRegions.add(r);
        if (w.ack !== undefined) ackedRegions.add(r);
      }
      for (let s = w.offset / SECTOR; s < (w.offset + w.length) / SECTOR; s++) {
        const list = touching.get(s);
        if (list) list.push(w);
        else touching.set(s, [w]);
      }
    }
    for (const [s, list] of touching) {
      const winner = list.find(
        (w) => w.ack !== undefined && list.every((x) => x === w || landedBefore(x, w)),
      );
      sectorState[s] = winner ? winner.id : UNKNOWN;
    }
  }

  function expectedSector(state: number, abs: number, into: Buffer): Buffer {
    if (state === NEVER) return ZERO_SECTOR;
    const w = writes[state];
    if (w.kind !== 'data') return ZERO_SECTOR;
    if (w.source === 'nbd') {
      stampSector(into, 0, w.id, abs);
      return into;
    }
    return into.fill(w.pattern);
  }

  /** Compares the volume file with the model, sector by sector, over [firstRegion, lastRegion]. */
  function checkContent(regions: Iterable<number>): void {
    const fd = openSync(volume, 'r');
    const buf = Buffer.alloc(REGION);
    const exp = Buffer.alloc(SECTOR);
    const bad: string[] = [];
    try {
      for (const r of regions) {
        const n = readSync(fd, buf, 0, REGION, r * REGION);
        assert.equal(n, REGION);
        for (let j = 0; j < REGION / SECTOR; j++) {
          const abs = (r * REGION) / SECTOR + j;
          const state = sectorState[abs];
          if (state === UNKNOWN) continue;
          const want = expectedSector(state, abs, exp);
          if (buf.compare(want, 0, SECTOR, j * SECTOR, (j + 1) * SECTOR) !== 0) {
            const w = state >= 0 ? writes[state] : undefined;
            bad.push(
              `sector ${abs} (offset ${abs * SECTOR}, region ${r}): expected ${
                w
                  ? `write #${w.id} (${w.source} ${w.kind} ${w.offset}+${w.length}, round ${w.round})`
                  : 'zeroes'
              }, found bytes ${buf.subarray(j * SECTOR, j * SECTOR + 16).toString('hex')}`,
            );
          }
        }
      }
    } finally {
      closeSync(fd);
    }
    assert.deepEqual(bad.slice(0, 10), [], `volume content differs from acknowledged writes (seed ${SEED})`);
  }

  async function checkDirty(d: Daemon, when: string): Promise<Set<number>> {
    const dirty = await getDirty(d);
    const missing = [...ackedRegions].filter((r) => !dirty.has(r));
    assert.deepEqual(
      missing,
      [],
      `${when}: regions written by acknowledged writes are not dirty: ${fmtRegions(missing)} (seed ${SEED})`,
    );
    const extra = [...dirty].filter((r) => !targetedRegions.has(r));
    assert.deepEqual(
      extra,
      [],
      `${when}: regions no write ever targeted are dirty: ${fmtRegions(extra)} (seed ${SEED})`,
    );
    const status = JSON.parse((await httpRequest(d.http!, '/status')).body) as {
      dirtyRegions: number;
      dirtyBytes: number;
      log: { capacityBytes: number };
    };
    assert.equal(status.dirtyRegions, dirty.size);
    assert.equal(status.dirtyBytes, dirty.size * REGION);
    logCapacity = status.log.capacityBytes;
    return dirty;
  }

  it(`${ROUNDS} rounds of SIGKILL mid-write keep every written region dirty and the data intact`, {
    skip,
    timeout: 150_000,
  }, async (t) => {
    t.diagnostic(`seed ${SEED} (replay with VOLREP_SEED=${SEED})`);
    for (let round = 0; round < ROUNDS; round++) {
      daemon = await startPrimary(volume, { http: true });
      const d = daemon;
      await checkDirty(d, `after restart ${round}`);
      const roundWrites: Write[] = [];
      const scatter = round % 4 === 2;
      const st: RoundStats = {
        round,
        type: scatter ? 'scatter' : 'hot',
        submitted: 0,
        acked: 0,
        qemuAcked: 0,
        killAfterMs: 0,
        stalled: false,
      };
      stats.push(st);
      let killed = false;
      let acked = 0;
      let onAckTarget: (() => void) | undefined;
      const clients: NbdClient[] = [];
      const driving: Promise<void>[] = [];
      let qemu: Promise<{ r: RunResult; script: Write[] }> | undefined;
      const t0 = Date.now();

      if (scatter) {
        // Small writes, each to a region not yet written this session, in random order.
        const order = Array.from({ length: SCATTER_REGIONS }, (_, i) => i);
        for (let i = order.length - 1; i > 0; i--) {
          const j = rng.int(i + 1);
          [order[i], order[j]] = [order[j], order[i]];
        }
        let pos = 0;
        const target = 1100 + rng.int(700);
        const c = await NbdClient.connect(d.nbd.host, d.nbd.port, 'volrep');
        clients.push(c);
        const reached = new Promise<void>((resolve) => {
          onAckTarget = () => {
            if (acked >= target) resolve();
          };
        });
        driving.push(
          drive(
            c,
            32,
            () => {
              if (pos >= order.length) return undefined;
              const region = order[pos++];
              const length = rng.pick([SECTOR, 4 * K, 4 * K, 8 * K]);
              const k = rng.int(100);
              const kind: Kind = k < 80 ? 'data' : k < 90 ? 'zero' : 'trim';
              const offset = region * REGION + rng.int((REGION - length) / SECTOR + 1) * SECTOR;
              const w = newWrite(round, 'nbd', 0, { kind, offset, length });
              roundWrites.push(w);
              return w;
            },
            () => killed,
            () => {
              acked++;
              onAckTarget?.();
            },
          ),
        );
        const timedOut = await Promise.race([
          reached.then(() => false),
          new Promise<boolean>((resolve) => setTimeout(() => resolve(true), 8000).unref()),
        ]);
        st.stalled = timedOut;
      } else {
        const centers = Array.from({ length: 3 + rng.int(3) }, () => rng.int(REGIONS));
        const connections = 1 + rng.int(2);
        for (let i = 0; i < connections; i++) {
          const c = await NbdClient.connect(d.nbd.host, d.nbd.port, 'volrep');
          clients.push(c);
          driving.push(
            drive(
              c,
              4 + rng.int(13),
              () => {
                const w = newWrite(round, 'nbd', 0, randomOp(rng.pick(centers)));
                roundWrites.push(w);
                return w;
              },
              () => killed,
              () => acked++,
            ),
          );
        }
        if (rng.chance(0.75)) {
          const script: Write[] = [];
          for (let i = 0; i < 400; i++)
            script.push(newWrite(round, `qemu${round}`, i, randomOp(rng.pick(centers))));
          const args = ['-f', 'raw'];
          for (const w of script) args.push('-c', qemuCommand(w));
          args.push(d.nbd.uri);
          qemu = run('qemu-io', args, { timeout: 30_000 }).then((r) => ({ r, script }));
        }
        await new Promise((resolve) => setTimeout(resolve, 60 + rng.int(500)));
      }

      // Read the engine's counters just before the kill (writes keep going meanwhile).
      const m = await httpRequest(d.http!, '/metrics').then(
        (r) => r.body,
        () => '',
      );
      st.logRecords = metricValue(m, 'volrep_log_records_total');
      st.logSyncs = metricValue(m, 'volrep_log_syncs_total');
      st.bitmapPersists = metricValue(m, 'volrep_bitmap_persists_total');
      st.logUsed = metricValue(m, 'volrep_log_used_bytes');
      await d.kill();
      killed = true;
      st.killAfterMs = Date.now() - t0;
      daemon = undefined;
      await Promise.all(driving);
      if (qemu) {
        const { r, script } = await qemu;
        const n = qemuAcked(r, script);
        st.qemuAcked = n;
        for (let i = 0; i < script.length; i++) {
          const w = script[i];
          if (i < n) w.ack = 0; // acknowledged (its timing relative to volrep's client is unknown)
          // Commands after the first failure were never sent: the connection was gone.
          if (i <= n) roundWrites.push(w);
        }
      }
      // (No close(): the server is gone and the client saw its sockets close.)
      st.submitted = roundWrites.length;
      st.acked = roundWrites.filter((w) => w.ack !== undefined).length;
      resolveRound(roundWrites);
      // Content check of the regions this round touched (the full volume is checked at the end).
      const touched = new Set<number>();
      for (const w of roundWrites) {
        const [a, b] = regionsOf(w.offset, w.length);
        for (let r = a; r <= b; r++) touched.add(r);
      }
      checkContent(touched);
    }

    // Final restart after the last kill: same checks, then the whole volume.
    daemon = await startPrimary(volume, { http: true });
    const dirty = await checkDirty(daemon, 'after the last restart');
    checkContent(Array.from({ length: REGIONS }, (_, r) => r));
    // A graceful stop and restart keeps exactly the same set.
    assert.equal(await daemon.stop(), 0, daemon.stderr());
    daemon = await startPrimary(volume, { http: true });
    assert.deepEqual(
      [...(await getDirty(daemon))].sort((a, b) => a - b),
      [...dirty].sort((a, b) => a - b),
    );
    assert.equal(await daemon.stop(), 0, daemon.stderr());
    daemon = undefined;

    for (const s of stats) t.diagnostic(JSON.stringify(s));
    t.diagnostic(
      `acked regions ${ackedRegions.size}, targeted ${targetedRegions.size}, dirty ${dirty.size} of ${REGIONS}; ` +
        `log capacity ${logCapacity}`,
    );
    let known = 0;
    for (const state of sectorState) if (state >= 0) known++;
    t.diagnostic(`sectors whose content was checked against a known write: ${known}`);
    assert.ok(known > 10_000, `the content model must pin down many sectors: ${known}`);
    // The workload did what it is meant to exercise.
    const stalled = stats.filter((s) => s.stalled).map((s) => s.round);
    assert.deepEqual(stalled, [], `scatter rounds that stopped making progress (log full?): ${stalled}`);
    assert.ok(
      stats.every((s) => s.acked > 0),
      'every round acknowledged some writes before the kill',
    );
    assert.ok(targetedRegions.size < REGIONS * 0.8, `(b) needs untargeted regions: ${targetedRegions.size}`);
    const folds = stats.filter((s) => (s.bitmapPersists ?? 0) >= 2).length;
    assert.ok(folds >= 1, 'a full log was folded into the bitmap (a second bitmap persist) in some round');
    const records = stats.reduce((sum, s) => sum + (s.logRecords ?? 0), 0);
    assert.ok(
      records * 56 > 3 * logCapacity,
      `the log wrapped around: ${records} records, capacity ${logCapacity}`,
    );
  });
});
