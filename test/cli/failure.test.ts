/**
 * After an I/O failure the daemon reports it and exits cleanly: exit code 1, one clear
 * `volrep: ...` line after the JSON log, no uncaught exception and no stack trace. The failure is
 * real: the volume (or the replica) lives on a tmpfs far smaller than the volume, so writes get
 * ENOSPC once it is full. Mounting needs root; without it (or if mount fails) the tests fail and
 * say so, they never skip.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { NbdClient } from '../../src/nbd/client.js';
import { createVolumeCli, httpRequest, nonEmptyLines, waitExit, waitFor } from '../helpers/clients.js';
import {
  type Daemon,
  identityOf,
  type SecondaryDaemon,
  startPrimary,
  startSecondary,
  tempDir,
} from '../helpers/daemon.js';

const M = 1024 * 1024;
/** The tmpfs holds the metadata and a few MiB of written data; the sparse volume is far larger. */
const TMPFS_SIZE = '3m';
const TMPFS_BYTES = 3 * M;
const VOLUME_SIZE = '64M';
/** The daemon stops well within this once a write failed; it only bounds a hang. */
const EXIT_TIMEOUT_MS = 10_000;

/** Mounts a tmpfs of TMPFS_SIZE on `dir`; throws (the test fails) when that is not possible. */
function mountTmpfs(dir: string): void {
  const uid = process.getuid?.();
  if (uid !== 0) {
    throw new Error(
      `this test must run as root: it mounts a ${TMPFS_SIZE} tmpfs to make volume writes fail with ENOSPC (uid is ${uid})`,
    );
  }
  mkdirSync(dir, { recursive: true });
  const r = spawnSync('mount', ['-t', 'tmpfs', '-o', `size=${TMPFS_SIZE}`, 'tmpfs', dir], {
    encoding: 'utf8',
  });
  if (r.status !== 0) {
    throw new Error(
      `mount -t tmpfs -o size=${TMPFS_SIZE} tmpfs ${dir} failed (exit ${r.status}${r.error ? `, ${r.error.message}` : ''}): ${r.stderr}` +
        'this test needs a tmpfs to make volume writes fail with ENOSPC',
    );
  }
}

function unmount(dir: string): void {
  const r = spawnSync('umount', [dir], { encoding: 'utf8' });
  if (r.status === 0) return;
  spawnSync('umount', ['-l', dir]);
  throw new Error(`umount ${dir} failed (exit ${r.status}): ${r.stderr}`);
}

function isJsonLine(line: string): boolean {
  if (!line.startsWith('{')) return false;
  try {
    JSON.parse(line);
    return true;
  } catch {
    return false;
  }
}

/**
 * The clean failure exit: code 1 (not a signal), and stderr is the JSON log followed by exactly
 * one plain line, `volrep: ...` matching `pattern`; no uncaught exception, no stack trace.
 */
function assertCleanFailure(
  exit: { code: number | null; signal: NodeJS.Signals | null },
  stderr: string,
  pattern: RegExp,
): void {
  const detail = `exit ${exit.code} signal ${exit.signal}\nstderr:\n${stderr}`;
  assert.equal(exit.signal, null, `killed by a signal instead of exiting\n${detail}`);
  assert.equal(exit.code, 1, `a runtime failure exits with 1\n${detail}`);
  const lines = nonEmptyLines(stderr);
  const plain = lines.filter((l) => !isJsonLine(l));
  assert.equal(plain.length, 1, `exactly one line besides the JSON log expected\n${detail}`);
  assert.equal(lines[lines.length - 1], plain[0], `the one line must come last\n${detail}`);
  assert.match(plain[0], /^volrep: /, detail);
  assert.match(plain[0], pattern, detail);
  assert.ok(stderr.endsWith('\n'), `stderr must end with a newline\n${detail}`);
  // Stack traces in the JSON log are escaped into one line; a printed one has lines of its own.
  assert.doesNotMatch(stderr, /^\s+at /m, `no stack trace\n${detail}`);
  assert.doesNotMatch(stderr, /Uncaught/, `no uncaught exception\n${detail}`);
  assert.doesNotMatch(plain.join('\n'), /node:internal/, `no node internals\n${detail}`);
}

describe('after an I/O failure the daemon reports it and exits cleanly', { timeout: 120_000 }, () => {
  let tmp: ReturnType<typeof tempDir>;
  /** A fresh tmpfs mount point per test (under tmp), unmounted in `after`. */
  const mounts: string[] = [];
  const daemons: Array<Daemon | SecondaryDaemon> = [];
  const clients: NbdClient[] = [];

  function smallDisk(name: string): string {
    const dir = path.join(tmp.dir, name);
    mountTmpfs(dir);
    mounts.push(dir);
    return dir;
  }

  before(() => {
    tmp = tempDir();
  });
  after(async () => {
    for (const c of clients) await c.close().catch(() => {});
    for (const d of daemons) await d.kill();
    const problems: string[] = [];
    for (const dir of mounts) {
      try {
        unmount(dir);
      } catch (err) {
        problems.push((err as Error).message);
      }
    }
    tmp?.cleanup();
    if (problems.length > 0) throw new Error(problems.join('\n'));
  });

  it('primary: a volume write that gets ENOSPC stops the daemon with exit 1 and one line', async () => {
    const disk = smallDisk('primary-disk');
    const volume = createVolumeCli(disk, 'v.img', VOLUME_SIZE, ['--log-size', '64K']);
    const primary = await startPrimary(volume);
    daemons.push(primary);
    const client = await NbdClient.connect(primary.nbd.host, primary.nbd.port, 'volrep');
    clients.push(client);

    // 1 MiB writes at distinct offsets (each allocates a fresh MiB of the tmpfs) until one fails.
    let written = 0;
    let refusal: Error | undefined;
    for (let i = 0; i < 32 && refusal === undefined; i++) {
      try {
        await client.write(i * 2 * M, Buffer.alloc(M, 0x5a));
        written++;
      } catch (err) {
        refusal = err as Error;
      }
    }
    assert.ok(refusal, `32 MiB of writes to a ${TMPFS_SIZE} tmpfs all succeeded\n${primary.stderr()}`);
    assert.ok(
      written * M < TMPFS_BYTES,
      `${written} MiB acknowledged on a ${TMPFS_SIZE} tmpfs: a failed write was reported as done`,
    );
    assert.match(refusal.message, /NBD error|connection closed/, refusal.message);

    const exit = await waitExit(primary.child, EXIT_TIMEOUT_MS);
    const stderr = primary.stderr();
    assertCleanFailure(exit, stderr, /^volrep: replication engine stopped after an I\/O error: .*ENOSPC/);
    assert.match(stderr, /"msg":"primary failed"/, stderr);
    assert.match(
      stderr,
      /"msg":"primary stopped"/,
      `the failure must still stop the daemon in order\n${stderr}`,
    );
    assert.equal(existsSync(`${volume}.volrep/lock`), false, `the volume lock must be released\n${stderr}`);

    // Restarted (on the still-full tmpfs), recovery finds every region written before the failure
    // dirty, the failed write's too (its log record was durable before the volume write was
    // tried): a failure never leaves a region that may differ from the replica marked clean.
    const again = await startPrimary(volume, { http: true });
    daemons.push(again);
    const dirty = JSON.parse((await httpRequest(again.http!, '/dirty')).body) as {
      regionSize: number;
      ranges: [number, number][];
    };
    const isDirty = (r: number) => dirty.ranges.some(([first, last]) => first <= r && r <= last);
    for (let i = 0; i <= written; i++) {
      for (let at = i * 2 * M; at < i * 2 * M + M; at += dirty.regionSize) {
        const region = at / dirty.regionSize;
        assert.ok(isDirty(region), `region ${region} (write ${i}) must be dirty: ${JSON.stringify(dirty)}`);
      }
    }
    assert.equal(await again.stop(), 0, again.stderr());
  });

  it('secondary: a replica write that gets ENOSPC stops the secondary with exit 1 and one line; the primary keeps serving', async () => {
    const disk = smallDisk('replica-disk');
    const source = createVolumeCli(tmp.dir, 'p.img', VOLUME_SIZE, ['--log-size', '64K']);
    const { volumeId } = JSON.parse(readFileSync(`${source}.volrep/meta.json`, 'utf8')) as {
      volumeId: string;
    };
    const replica = createVolumeCli(disk, 'r.img', VOLUME_SIZE, [
      '--log-size',
      '64K',
      '--secondary-of',
      volumeId,
    ]);
    const secondary = await startSecondary(replica, { extra: ['--allow-peer', identityOf(source)] });
    daemons.push(secondary);
    // --assume-clean: no initial full sync, so only the writes below reach the replica.
    const primary = await startPrimary(source, {
      extra: ['--peer', secondary.listen, '--peer-fingerprint', identityOf(replica), '--assume-clean'],
    });
    daemons.push(primary);
    await waitFor(
      () => /"msg":"primary connected"/.test(secondary.stderr()),
      `the primary to connect\n${secondary.stderr()}`,
    );
    const client = await NbdClient.connect(primary.nbd.host, primary.nbd.port, 'volrep');
    clients.push(client);

    // Twice what the replica's tmpfs holds: every write completes on the primary (async mode),
    // and applying them fills the replica's tmpfs.
    for (let i = 0; i < 2 * (TMPFS_BYTES / M); i++) await client.write(i * 2 * M, Buffer.alloc(M, 0xa5));

    const exit = await waitExit(secondary.child, EXIT_TIMEOUT_MS);
    const stderr = secondary.stderr();
    assertCleanFailure(exit, stderr, /^volrep: replica failed after an I\/O error: .*ENOSPC/);
    assert.match(stderr, /"msg":"secondary failed"/, stderr);
    assert.match(stderr, /"msg":"secondary stopped"/, stderr);
    assert.equal(existsSync(`${replica}.volrep/lock`), false, `the replica lock must be released\n${stderr}`);

    // The primary is unharmed: it sees the link go down, keeps serving, and stops normally.
    await waitFor(
      () => /"msg":"replication link down"/.test(primary.stderr()),
      `the primary to notice the lost link\n${primary.stderr()}`,
    );
    assert.equal(primary.child.exitCode, null, `the primary must keep running\n${primary.stderr()}`);
    await client.write(60 * M, Buffer.alloc(4096, 1));
    assert.deepEqual([...(await client.read(60 * M, 4))], [1, 1, 1, 1]);
    await client.close();
    assert.equal(await primary.stop(), 0, primary.stderr());
  });
});
