/**
 * `volrep primary` standalone (no secondary), as a real process: every write leaves its regions
 * dirty; /status, /dirty and /metrics report the engine; a hot working set costs almost no log
 * syncs (the activity window); a graceful SIGTERM persists the bitmap so that a restart finds
 * the same dirty set in it.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { after, before, describe, it } from 'node:test';
import { NbdClient } from '../../src/nbd/client.js';
import { createVolumeCli, httpRequest, metricValue, readRange } from '../helpers/clients.js';
import { type Daemon, startPrimary, tempDir } from '../helpers/daemon.js';

const K = 1024;
const M = 1024 * K;
const REGION = 64 * K;
const SIZE = 64 * M;
const REGIONS = SIZE / REGION;

interface Status {
  role: string;
  volume: { size: number; regionSize: number };
  dirtyRegions: number;
  dirtyBytes: number;
  pendingUpdates: number;
  pendingBytes: number;
  log: { usedBytes: number; capacityBytes: number; activeTransactions: number };
}

interface Recovery {
  bitmapDirty: number;
  dirty: number;
  records: number;
  incompleteTransactions: number;
}

async function getJson<T>(daemon: Daemon, urlPath: string): Promise<T> {
  const r = await httpRequest(daemon.http!, urlPath);
  assert.equal(r.status, 200, `${urlPath}: ${r.body}`);
  assert.match(r.contentType, /application\/json/);
  return JSON.parse(r.body) as T;
}

async function metrics(daemon: Daemon): Promise<string> {
  const r = await httpRequest(daemon.http!, '/metrics');
  assert.equal(r.status, 200);
  return r.body;
}

function metric(text: string, name: string): number {
  const v = metricValue(text, name);
  assert.notEqual(v, undefined, `metric ${name} missing`);
  return v!;
}

/** The dirty regions from GET /dirty, expanded and sorted. */
async function dirtySet(daemon: Daemon): Promise<number[]> {
  const d = await getJson<{ regionSize: number; ranges: [number, number][] }>(daemon, '/dirty');
  assert.equal(d.regionSize, REGION);
  const out: number[] = [];
  let prev = -2;
  for (const [a, b] of d.ranges) {
    assert.ok(Number.isInteger(a) && Number.isInteger(b) && a <= b, JSON.stringify(d.ranges));
    assert.ok(a > prev + 1, `ranges must be sorted and coalesced: ${JSON.stringify(d.ranges)}`);
    assert.ok(b < REGIONS, `region ${b} beyond the volume`);
    for (let r = a; r <= b; r++) out.push(r);
    prev = b;
  }
  return out;
}

/** The recovery report from the daemon's "primary serving" log line. */
function recoveryOf(daemon: Daemon): Recovery {
  const line = daemon
    .stderr()
    .split('\n')
    .find((l) => l.includes('"primary serving"'));
  assert.ok(line, 'no "primary serving" line');
  return (JSON.parse(line) as { recovery: Recovery }).recovery;
}

function regionsOf(offset: number, length: number): number[] {
  const out: number[] = [];
  for (let r = Math.floor(offset / REGION); r <= Math.floor((offset + length - 1) / REGION); r++) out.push(r);
  return out;
}

describe('volrep primary standalone', () => {
  const tmp = tempDir('volrep-standalone-');
  let volume = '';
  let daemon: Daemon | undefined;
  let client: NbdClient | undefined;
  /** Regions written so far, the dirty set we expect. */
  const written = new Set<number>();

  before(() => {
    volume = createVolumeCli(tmp.dir, 'sa.img', '64M', ['--region-size', '64K', '--log-size', '1M']);
  });
  after(async () => {
    await client?.close().catch(() => {});
    await daemon?.kill();
    tmp.cleanup();
  });

  it('starts clean, with /status, /dirty and /metrics describing the engine', async () => {
    daemon = await startPrimary(volume, { http: true });
    const s = await getJson<Status>(daemon, '/status');
    assert.equal(s.role, 'primary');
    assert.equal(s.volume.size, SIZE);
    assert.equal(s.volume.regionSize, REGION);
    assert.equal(s.dirtyRegions, 0);
    assert.equal(s.dirtyBytes, 0);
    assert.equal(s.pendingUpdates, 0);
    assert.equal(s.pendingBytes, 0);
    assert.ok(s.log.capacityBytes > 0 && s.log.capacityBytes <= M, JSON.stringify(s.log));
    assert.ok(s.log.usedBytes >= 0 && s.log.usedBytes <= s.log.capacityBytes, JSON.stringify(s.log));
    assert.ok(Number.isInteger(s.log.activeTransactions) && s.log.activeTransactions >= 0);
    assert.deepEqual(await dirtySet(daemon), []);
    const m = await metrics(daemon);
    for (const name of [
      'volrep_dirty_regions',
      'volrep_pending_updates',
      'volrep_log_used_bytes',
      'volrep_log_syncs_total',
      'volrep_log_records_total',
      'volrep_bitmap_persists_total',
    ]) {
      const v = metric(m, name);
      assert.ok(Number.isFinite(v) && v >= 0, `${name} = ${v}`);
    }
    assert.equal(metric(m, 'volrep_dirty_regions'), 0);
    assert.equal(metric(m, 'volrep_pending_updates'), 0);
    // The startup checkpoint may append a record between the two reads: the metric must match the
    // status read before or after it.
    const after = await getJson<Status>(daemon, '/status');
    const used = metric(m, 'volrep_log_used_bytes');
    assert.ok(
      used === s.log.usedBytes || used === after.log.usedBytes,
      `${used} vs ${s.log.usedBytes}/${after.log.usedBytes}`,
    );
    const rec = recoveryOf(daemon);
    assert.equal(rec.dirty, 0);
    assert.equal(rec.bitmapDirty, 0);
  });

  it('writes, zeroes and trims (some across region boundaries) leave exactly their regions dirty', async () => {
    const d = daemon!;
    client = await NbdClient.connect(d.nbd.host, d.nbd.port, 'volrep');
    const before = await metrics(d);
    const ops: Array<[string, number, number]> = [
      ['write', 0, 4 * K],
      ['write', 3 * REGION - 512, 1024], // regions 2 and 3
      ['zero', 10 * REGION + 4 * K, 128 * K], // 10, 11, 12
      ['trim', 20 * REGION, REGION], // exactly 20
      ['write', 30 * REGION - 4 * K, 4 * K], // 29 only (ends at the boundary)
      ['write', SIZE - 512, 512], // the last region
    ];
    for (const [kind, offset, length] of ops) {
      if (kind === 'write') await client.write(offset, Buffer.alloc(length, 0x5a));
      else if (kind === 'zero') await client.writeZeroes(offset, length);
      else await client.trim(offset, length);
      for (const r of regionsOf(offset, length)) written.add(r);
    }
    const expected = [...written].sort((a, b) => a - b);
    assert.deepEqual(expected, [0, 2, 3, 10, 11, 12, 20, 29, REGIONS - 1]);
    assert.deepEqual(await dirtySet(d), expected);
    const s = await getJson<Status>(d, '/status');
    assert.equal(s.dirtyRegions, expected.length);
    assert.equal(s.dirtyBytes, expected.length * REGION);
    // Standalone: nothing is ever sent, so nothing is pending an ack.
    assert.equal(s.pendingUpdates, 0);
    assert.equal(s.pendingBytes, 0);
    assert.ok(s.log.usedBytes > 0 && s.log.usedBytes <= s.log.capacityBytes, JSON.stringify(s.log));
    const after = await metrics(d);
    assert.equal(metric(after, 'volrep_dirty_regions'), expected.length);
    assert.ok(
      metric(after, 'volrep_log_records_total') > metric(before, 'volrep_log_records_total'),
      'writes to new regions append log records',
    );
    assert.ok(metric(after, 'volrep_log_syncs_total') > metric(before, 'volrep_log_syncs_total'));
    assert.equal(metric(after, 'volrep_log_used_bytes'), s.log.usedBytes);
  });

  it('a hot working set (2000 writes within 8 regions) costs very few log syncs', async (t) => {
    const d = daemon!;
    const c = client!;
    const hot = [40, 41, 42, 43, 44, 45, 46, 47];
    const before = await metrics(d);
    const N = 2000;
    const DEPTH = 16;
    let next = 0;
    const worker = async () => {
      for (let i = next++; i < N; i = next++) {
        const region = hot[i % hot.length];
        // Mostly inside a region; every 50th write straddles into the next hot region.
        const offset =
          i % 50 === 0 && region !== 47
            ? (region + 1) * REGION - 2 * K
            : region * REGION + ((i * 4 * K) % (REGION - 4 * K));
        await c.write(offset, Buffer.alloc(4 * K, i & 0xff));
      }
    };
    await Promise.all(Array.from({ length: DEPTH }, worker));
    for (const r of hot) written.add(r);
    const after = await metrics(d);
    const syncs = metric(after, 'volrep_log_syncs_total') - metric(before, 'volrep_log_syncs_total');
    const records = metric(after, 'volrep_log_records_total') - metric(before, 'volrep_log_records_total');
    t.diagnostic(`${N} hot writes: ${syncs} log syncs, ${records} log records`);
    assert.ok(syncs >= 1, 'the first writes to the 8 new regions need a durable record');
    assert.ok(syncs < 50, `${N} writes to 8 regions cost ${syncs} log syncs (activity window not working?)`);
    assert.ok(records < 50, `${N} writes to 8 regions appended ${records} log records`);
    const writes =
      metricValue(after, 'volrep_nbd_requests_total', { command: 'write', result: 'ok' })! -
      metricValue(before, 'volrep_nbd_requests_total', { command: 'write', result: 'ok' })!;
    assert.equal(writes, N);
    assert.deepEqual(
      await dirtySet(d),
      [...written].sort((a, b) => a - b),
    );
  });

  it('SIGTERM persists the bitmap: the restart finds the same dirty set, all of it in the bitmap', async () => {
    const d = daemon!;
    await client!.flush();
    await client!.close();
    client = undefined;
    const expected = [...written].sort((a, b) => a - b);
    assert.deepEqual(await dirtySet(d), expected);
    const persistsBefore = metric(await metrics(d), 'volrep_bitmap_persists_total');
    const bitmapPath = `${volume}.volrep/bitmap`;
    const bitmapBefore = readFileSync(bitmapPath);
    assert.equal(await d.stop(), 0, d.stderr());
    daemon = undefined;
    const bitmapAfter = readFileSync(bitmapPath);
    assert.notDeepEqual(bitmapAfter, bitmapBefore, 'the bitmap file must be rewritten on SIGTERM');

    daemon = await startPrimary(volume, { http: true });
    assert.deepEqual(await dirtySet(daemon), expected);
    const rec = recoveryOf(daemon);
    assert.equal(rec.dirty, expected.length, JSON.stringify(rec));
    // Everything came from the bitmap that the graceful stop persisted, not from the log.
    assert.equal(rec.bitmapDirty, expected.length, JSON.stringify(rec));
    const s = await getJson<Status>(daemon, '/status');
    assert.equal(s.dirtyRegions, expected.length);
    assert.equal(s.dirtyBytes, expected.length * REGION);
    // The new process persisted the recovered state at startup; its counter started from 0.
    const m = await metrics(daemon);
    assert.ok(
      metric(m, 'volrep_bitmap_persists_total') >= 1,
      `bitmap persists after restart: ${metric(m, 'volrep_bitmap_persists_total')} (before: ${persistsBefore})`,
    );
    assert.equal(metric(m, 'volrep_dirty_regions'), expected.length);
    // The data is still there.
    assert.deepEqual(readRange(volume, 3 * REGION - 512, 1024), Buffer.alloc(1024, 0x5a));
  });

  it('writes after a restart add to the set; a second SIGTERM/restart keeps it', async () => {
    const d = daemon!;
    client = await NbdClient.connect(d.nbd.host, d.nbd.port, 'volrep');
    await client.write(50 * REGION + 60 * K, Buffer.alloc(8 * K, 0x33)); // 50 and 51
    await client.writeZeroes(2 * REGION, 4 * K); // already dirty
    await client.close();
    client = undefined;
    for (const r of [50, 51]) written.add(r);
    const expected = [...written].sort((a, b) => a - b);
    assert.deepEqual(await dirtySet(d), expected);
    assert.equal(await d.stop(), 0, d.stderr());
    daemon = await startPrimary(volume, { http: true });
    assert.deepEqual(await dirtySet(daemon), expected);
    assert.equal(recoveryOf(daemon).bitmapDirty, expected.length);
    assert.equal(await daemon.stop(), 0);
    daemon = undefined;
  });
});
