/**
 * The primary node on real files, replicating over TCP to a real secondary in the same process:
 * writes and zeroes land on the replica; a write larger than one update while connected (defect
 * 5); a graceful stop leaves nothing to resend (defect 8); an I/O failure stops the node cleanly
 * (defect 7).
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import pino from 'pino';
import { type RunningSecondary, startSecondary } from '../../src/daemon/secondary.js';
import type { BlockDevice, Done } from '../../src/io/block-device.js';
import { NodeBlockFile } from '../../src/io/block-file.js';
import { systemClock } from '../../src/io/clock.js';
import { tlsDialer } from '../../src/io/tls.js';
import { nodeIdentity } from '../../src/security/identity.js';
import { PrimaryNode } from '../../src/shell/primary-node.js';
import { Volume } from '../../src/volume/replicated.js';
import { BITMAP_FILE, createVolume, LOG_FILE, PAIR_STATE_FILE } from '../../src/volume/volume.js';
import { waitFor } from '../helpers/clients.js';
import { tempDir } from '../helpers/daemon.js';

const M = 1024 * 1024;
const silent = pino({ level: 'silent' });

/** A fresh 4 MiB volume's metadata files, opened (the node under test gets a fake volume device). */
async function freshMetadata(prefix: string): Promise<{
  meta: { size: number; regionSize: number };
  files: NodeBlockFile[];
  cleanup: () => Promise<void>;
}> {
  const tmp = tempDir(prefix);
  const volumePath = path.join(tmp.dir, 'v.img');
  const meta = await createVolume({ volumePath, size: 4 * M, logSize: 64 * 1024 });
  const metaDir = `${volumePath}.volrep`;
  const files = await Promise.all(
    [LOG_FILE, BITMAP_FILE, PAIR_STATE_FILE].map((f) => NodeBlockFile.open(path.join(metaDir, f))),
  );
  const cleanup = async () => {
    for (const f of files) await f.close();
    tmp.cleanup();
  };
  return { meta, files, cleanup };
}

/** A volume device whose every request succeeds, but for writes as `write` decides. */
function fakeVolume(size: number, write: BlockDevice['write']): BlockDevice {
  return {
    size,
    readOnly: false,
    read: (_o, _l, _b, _a, done: Done) => done(null),
    write,
    writeZeroes: (_o, _l, _f, done: Done) => done(null),
    trim: (_o, _l, _f, done: Done) => done(null),
    flush: (done: Done) => setImmediate(() => done(null)),
  };
}

/** A standalone primary node over those files, and one 4 KiB write to it. */
async function openStandaloneNode(
  storage: Parameters<typeof PrimaryNode.open>[0],
  meta: { size: number; regionSize: number },
  onFailure?: (err: Error) => void,
): Promise<{
  node: PrimaryNode;
  submit: (offset: number, released?: (reusable: boolean) => void) => Promise<Error | null>;
}> {
  const node = await PrimaryNode.open(
    storage,
    {
      volumeSize: meta.size,
      regionSize: meta.regionSize,
      activityWindowRegions: 16,
      inflightBytesMax: M,
      ackTimeoutMs: 5000,
    },
    { clock: systemClock, logger: silent, onFailure },
  );
  const submit = (offset: number, released?: (reusable: boolean) => void) =>
    new Promise<Error | null>((resolve) =>
      node.submit(
        [{ offset, kind: 'data', length: 4096, data: [Buffer.alloc(4096, 1)] }],
        {},
        resolve,
        released,
      ),
    );
  return { node, submit };
}

async function pair(size: number): Promise<{
  dir: string;
  primary: string;
  replica: string;
  secondary: RunningSecondary;
  open: () => Promise<Volume>;
  cleanup: () => Promise<void>;
}> {
  const tmp = tempDir('volrep-node-');
  const primary = path.join(tmp.dir, 'p.img');
  const replica = path.join(tmp.dir, 'r.img');
  const meta = await createVolume({ volumePath: primary, size, logSize: 256 * 1024 });
  await createVolume({
    volumePath: replica,
    size,
    role: 'secondary',
    volumeId: meta.volumeId,
    logSize: 64 * 1024,
  });
  const primaryId = await nodeIdentity(`${primary}.volrep`);
  const replicaId = await nodeIdentity(`${replica}.volrep`);
  const secondary = await startSecondary({
    volumePath: replica,
    listen: { host: '127.0.0.1', port: 0 },
    link: { mode: 'tls', trust: { fingerprints: [primaryId.fingerprint] } },
    logger: silent,
  });
  const port = Number(secondary.listenAddress.split(':').pop());
  const security = { identity: primaryId, trust: { fingerprints: [replicaId.fingerprint] } };
  const refused = (f: unknown) => assert.fail(`refused: ${JSON.stringify(f)}`);
  const open = () =>
    Volume.open(primary, {
      link: { dialer: tlsDialer('127.0.0.1', port, security, refused), assumeClean: true },
      logger: silent,
    });
  return {
    dir: tmp.dir,
    primary,
    replica,
    secondary,
    open,
    cleanup: async () => {
      await secondary.close();
      tmp.cleanup();
    },
  };
}

async function inSync(volume: Volume): Promise<void> {
  await waitFor(
    () => {
      const s = volume.status();
      return (
        s.link?.state === 'streaming' &&
        s.link.replicaConsistent &&
        s.dirtyRegions === 0 &&
        s.pendingUpdates === 0
      );
    },
    `in sync: ${JSON.stringify(volume.status())}`,
    30_000,
  );
}

function sameBytes(a: string, b: string, offset: number, length: number): boolean {
  return readFileSync(a)
    .subarray(offset, offset + length)
    .equals(readFileSync(b).subarray(offset, offset + length));
}

describe('the primary node on real files with a real secondary', () => {
  const cleanups: Array<() => Promise<void>> = [];
  after(async () => {
    for (const c of cleanups) await c();
  });

  it('replicates writes and zeroes (over data), and a write larger than one update while connected', async () => {
    const p = await pair(96 * M);
    cleanups.push(p.cleanup);
    const volume = await p.open();
    try {
      await inSync(volume);
      await volume.transaction().write(1000, Buffer.alloc(6000, 7)).commit();
      await volume.transaction().zero(2000, 1000).commit(); // zeroes over data, not over zeroes
      await volume.flush();
      await inSync(volume);
      assert.ok(sameBytes(p.primary, p.replica, 0, 8192), 'replica equals volume');
      assert.ok(
        readFileSync(p.replica).subarray(2000, 3000).equals(Buffer.alloc(1000)),
        'the zeroes reached the replica',
      );
      assert.ok(readFileSync(p.replica).subarray(3000, 7000).equals(Buffer.alloc(4000, 7)));
      // Defect 5: 40 MiB in one library write is more than one frame carries: it goes as pieces.
      const big = randomBytes(40 * M);
      await volume
        .transaction()
        .write(8 * M, big)
        .commit();
      await volume.flush();
      await inSync(volume);
      assert.ok(
        readFileSync(p.replica)
          .subarray(8 * M, 48 * M)
          .equals(big),
        'the 40 MiB write is on the replica',
      );
    } finally {
      await volume.close();
    }
  });

  it('a graceful stop leaves nothing to resend after the restart (defect 8)', async () => {
    const p = await pair(32 * M);
    cleanups.push(p.cleanup);
    let volume = await p.open();
    await inSync(volume);
    for (let i = 0; i < 200; i++)
      await volume
        .transaction()
        .write(i * 65536 + 512, randomBytes(4096))
        .commit();
    await inSync(volume);
    await volume.close();
    volume = await p.open();
    try {
      assert.equal(volume.recovery.dirty, 0, `recovered ${JSON.stringify(volume.recovery)}`);
      assert.equal(volume.status().dirtyRegions, 0);
      await inSync(volume);
      assert.equal(volume.node.counters.resyncBytes, 0, 'nothing resent');
    } finally {
      await volume.close();
    }
  });

  it('writes held for a new generation fail, not hang, when saving that generation fails', async () => {
    const { meta, files, cleanup } = await freshMetadata('volrep-fail-gen-');
    cleanups.push(cleanup);
    const real = files[2];
    const pairState = {
      size: real.size,
      read: (o: number, l: number) => real.read(o, l),
      write: () => Promise.reject(new Error('EIO: the pair state went away')),
      sync: () => real.sync(),
    };
    const volume = fakeVolume(meta.size, (_o, _d, _l, _f, done: Done) => setImmediate(() => done(null)));
    const { node, submit } = await openStandaloneNode(
      { log: files[0], bitmap: files[1], pairState, volume },
      meta,
    );
    // The first writes of a standalone primary wait for its new generation's record.
    const outcomes = await Promise.race([
      Promise.all([submit(0), submit(65536)]),
      new Promise<'hung'>((r) => setTimeout(() => r('hung'), 3000)),
    ]);
    assert.notEqual(outcomes, 'hung', 'the held writes must complete');
    for (const err of outcomes as Array<Error | null>)
      assert.match(String(err?.message), /stopped after an I\/O error: EIO: the pair state went away/);
    await node.close();
  });

  it("a node that fails lets go of every write's data once, not for reuse where a write may still read it", async () => {
    // Volume writes that never finish, then a log sync that fails: the node stops with writes
    // still reading their data. Each caller must hear once (or an NBD client's receive memory
    // stays held), and must not reuse what a volume write may still read.
    const { meta, files, cleanup } = await freshMetadata('volrep-fail-lease-');
    cleanups.push(cleanup);
    const real = files[0];
    let syncs = 0;
    const log = {
      size: real.size,
      read: (o: number, l: number) => real.read(o, l),
      write: (o: number, d: Uint8Array) => real.write(o, d),
      sync: () => (++syncs > 3 ? Promise.reject(new Error('EIO: the log went away')) : real.sync()),
    };
    const parked: Done[] = [];
    const volume = fakeVolume(meta.size, (_o, _d, _l, _f, done: Done) => parked.push(done));
    const { node, submit } = await openStandaloneNode(
      { log, bitmap: files[1], pairState: files[2], volume },
      meta,
    );
    const heard: boolean[][] = Array.from({ length: 6 }, () => []);
    const outcomes = Array.from({ length: 6 }, (_, i) => submit(i * 3 * 65536, (r) => heard[i].push(r)));
    await waitFor(() => node.failed !== null, 'the node to fail on the log sync');
    for (const finish of parked.splice(0)) finish(null); // the stuck writes finish after all
    await Promise.race([Promise.all(outcomes), new Promise((r) => setTimeout(r, 2000))]);
    await new Promise((r) => setTimeout(r, 50));
    for (const [i, h] of heard.entries()) assert.equal(h.length, 1, `write ${i} let go of ${h.length} times`);
    assert.ok(
      heard.some((h) => h[0] === false),
      'a write whose volume write was still running is let go of as not reusable',
    );
    await node.close();
  });

  it('an I/O failure stops the node: requests fail with a clear error, the owner is told once (defect 7)', async () => {
    const { meta, files, cleanup } = await freshMetadata('volrep-fail-');
    cleanups.push(cleanup);
    let writes = 0;
    const failing = fakeVolume(meta.size, (_o, _d, _l, _f, done: Done) =>
      setImmediate(() => done(++writes > 2 ? new Error('EIO: the disk went away') : null)),
    );
    const failures: Error[] = [];
    const stray: unknown[] = [];
    const onStray = (err: unknown) => stray.push(err);
    process.on('unhandledRejection', onStray);
    try {
      const { node, submit } = await openStandaloneNode(
        { log: files[0], bitmap: files[1], pairState: files[2], volume: failing },
        meta,
        (err) => failures.push(err),
      );
      assert.equal(await submit(0), null);
      assert.equal(await submit(65536), null);
      const err = await submit(131072);
      assert.match(String(err?.message), /replication engine stopped after an I\/O error: EIO/);
      assert.equal((err as { code?: string }).code, 'VOLREP_ERR_IO');
      assert.equal(failures.length, 1, 'told once');
      assert.match(String(await submit(0)), /EIO/, 'later requests fail at once with the same error');
      await new Promise((r) => setTimeout(r, 300)); // timers that could throw would have by now
      await node.close();
      assert.deepEqual(stray, [], 'nothing escapes as an unhandled rejection');
    } finally {
      process.off('unhandledRejection', onStray);
    }
  });
});
