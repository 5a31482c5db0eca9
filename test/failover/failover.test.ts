/**
 * Failover and failback with real processes and a real client: SIGKILL the primary mid-workload,
 * promote the replica, check what the client saw completed is there, write on the new primary,
 * bring the old primary back as its secondary, and check that exactly the union of (regions
 * written on the new primary since the promotion) ∪ (regions the old primary never got acked)
 * is sent — against /metrics — and that both volumes end byte-identical.
 *
 * Prints, for the note, the old primary's side of the union (what its recovery can prove may
 * differ: the regions its log still covers) against the regions that really differed.
 */
import assert from 'node:assert/strict';
import { after, describe, it } from 'node:test';
import { NbdClient } from '../../src/nbd/client.js';
import { prngBytes, testSeed } from '../pair/pair.js';
import { Prng } from '../sim/prng.js';
import { REGION, type Site, Sites } from './sites.js';

const BLOCK = 4096;

/** The pattern of write `n` (its index in the first 8 bytes, then seeded bytes). */
function pattern(seed: number, n: number): Buffer {
  const b = prngBytes(new Prng(seed * 1_000_003 + n), BLOCK);
  b.writeUInt32BE(n, 0);
  return b;
}

/**
 * Writes distinct 4 KiB blocks (a seeded permutation of the volume's blocks), `depth` in flight,
 * recording each one the server reported complete, until stopped or the connection is lost.
 */
class RecordingWriter {
  readonly completed = new Map<number, number>(); // block -> write number
  private stopping = false;
  private loops: Promise<void>[] = [];
  private next = 0;
  private client: NbdClient | undefined;
  private readonly order: number[];

  constructor(
    private readonly seed: number,
    blocks: number,
  ) {
    const prng = new Prng(seed);
    this.order = Array.from({ length: blocks }, (_, i) => i);
    for (let i = blocks - 1; i > 0; i--) {
      const j = prng.int(i + 1);
      [this.order[i], this.order[j]] = [this.order[j], this.order[i]];
    }
  }

  async start(nbd: { host: string; port: number }, depth = 8): Promise<void> {
    this.client = await NbdClient.connect(nbd.host, nbd.port, 'volrep');
    for (let i = 0; i < depth; i++) this.loops.push(this.loop(this.client));
  }

  private async loop(client: NbdClient): Promise<void> {
    while (!this.stopping && this.next < this.order.length) {
      const n = this.next++;
      const block = this.order[n];
      try {
        await client.write(block * BLOCK, pattern(this.seed, n));
      } catch {
        return; // the primary is gone
      }
      this.completed.set(block, n);
    }
  }

  async stop(): Promise<void> {
    this.stopping = true;
    await Promise.all(this.loops);
  }
}

async function readBlock(client: NbdClient, block: number): Promise<Buffer> {
  return client.read(block * BLOCK, BLOCK);
}

function ok(what: string, r: { status: number | null; stdout: string; stderr: string }): void {
  assert.equal(r.status, 0, `${what}: exit ${r.status}\n${r.stdout}\n${r.stderr}`);
}

/**
 * The failback after a failover: the new primary `np` writes `regions`, stops; the old primary
 * `op` is demoted and started as a secondary; the union of both sides' sets is resynced, and
 * only that. Returns the figures for the note.
 */
async function failback(
  sites: Sites,
  np: Site,
  op: Site,
  regions: number[],
): Promise<{ union: number; newSide: number; oldSide: number; reallyDiffered: number; sentBytes: number }> {
  const client = await NbdClient.connect(np.primary!.nbd.host, np.primary!.nbd.port, 'volrep');
  for (const r of regions) await client.write(r * REGION + 512, Buffer.alloc(1024, 0xfe));
  await client.flush();
  await client.close();
  const newSide = await sites.dirtyRegions(np);
  await sites.stop(np);
  // The old primary returns: demoted (its unacked tail may be overwritten), started as a
  // secondary, its recovery tells which regions it may hold differently.
  ok('demote', sites.demote(op));
  await sites.startSecondary(op);
  const oldSide = await sites.dirtyRegions(op);
  const reallyDiffered = sites.differing();
  const union = new Set([...newSide, ...oldSide]);
  for (const r of reallyDiffered) assert.ok(union.has(r), `region ${r} differs and is in neither side's set`);
  await sites.startPrimary(np);
  await sites.waitInSync(np, 'the failback resync');
  const sentBytes = await sites.metric(np, 'volrep_resync_bytes_total');
  assert.equal(sentBytes, union.size * REGION, `resync bytes = |union| × region (union ${union.size})`);
  await sites.assertIdentical('after the failback');
  return {
    union: union.size,
    newSide: newSide.size,
    oldSide: oldSide.size,
    reallyDiffered: reallyDiffered.length,
    sentBytes,
  };
}

describe('failover and failback', { timeout: 180_000 }, () => {
  const all: Sites[] = [];
  after(async () => {
    for (const sites of all) await sites.cleanup();
  });

  it('sync mode: every write the client saw completed is on the promoted replica; failback sends only the union', async () => {
    const seed = testSeed('failover sync');
    const sites = await Sites.create('32M');
    all.push(sites);
    const { a, b } = sites;
    await sites.startSecondary(b);
    await sites.startPrimary(a, ['--mode', 'sync']);
    await sites.waitInSync(a, 'the initial sync');
    const writer = new RecordingWriter(seed, sites.size / BLOCK);
    await writer.start(a.primary!.nbd);
    while (writer.completed.size < 400) await new Promise((r) => setTimeout(r, 5));
    await sites.kill(a); // mid-workload: writes in flight
    await writer.stop();
    // The surviving site: stop its secondary, promote it, serve it.
    await sites.stop(b);
    ok('promote', sites.promote(b));
    await sites.startPrimary(b);
    const client = await NbdClient.connect(b.primary!.nbd.host, b.primary!.nbd.port, 'volrep');
    for (const [block, n] of writer.completed) {
      const got = await readBlock(client, block);
      assert.ok(
        got.equals(pattern(seed, n)),
        `completed write ${n} (block ${block}) is not on the promoted replica`,
      );
    }
    await client.close();
    const figures = await failback(sites, b, a, [1, 2, 100, 300, 500]);
    console.log(
      `failover sync (seed ${seed}): ${writer.completed.size} completed writes all on the replica; failback: ` +
        `union ${figures.union} regions (new primary ${figures.newSide}, old primary's recovery ${figures.oldSide}), ` +
        `really differing ${figures.reallyDiffered}, resync bytes ${figures.sentBytes}`,
    );
  });

  it('async mode: what the client saw completed before the last ack is there; the loss is reported; failback sends only the union', async () => {
    const seed = testSeed('failover async');
    const sites = await Sites.create('32M');
    all.push(sites);
    const { a, b } = sites;
    await sites.startSecondary(b);
    // A small activity window: the old primary's recovery then names few more regions than differ.
    await sites.startPrimary(a, ['--activity-window', '2M']);
    await sites.waitInSync(a, 'the initial sync');
    const writer = new RecordingWriter(seed, sites.size / BLOCK);
    await writer.start(a.primary!.nbd);
    while (writer.completed.size < 400) await new Promise((r) => setTimeout(r, 5));
    const pending = (await sites.status(a)).pendingBytes as number;
    await sites.kill(a);
    await writer.stop();
    await sites.stop(b);
    ok('promote', sites.promote(b));
    await sites.startPrimary(b);
    const client = await NbdClient.connect(b.primary!.nbd.host, b.primary!.nbd.port, 'volrep');
    let lost = 0;
    for (const [block, n] of writer.completed)
      if (!(await readBlock(client, block)).equals(pattern(seed, n))) lost++;
    await client.close();
    const figures = await failback(sites, b, a, [3, 4, 200]);
    console.log(
      `failover async (seed ${seed}): ${writer.completed.size} completed writes, ${lost} (${lost * BLOCK} bytes) not on the replica ` +
        `(${pending} bytes were unacked shortly before the kill); failback: union ${figures.union} regions ` +
        `(new primary ${figures.newSide}, old primary's recovery ${figures.oldSide}), really differing ${figures.reallyDiffered}, ` +
        `resync bytes ${figures.sentBytes}`,
    );
  });
});
