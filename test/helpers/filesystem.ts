/**
 * A real file system on a volrep NBD export, as root: nbdfuse exposes the export as a file,
 * losetup makes it a block device, mkfs.ext4 and mount do the rest. Teardown is lazy and bounded
 * in time, because the server may have been SIGKILLed under it.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, mkdirSync } from 'node:fs';
import path from 'node:path';
import { describeRun, run, waitFor } from './clients.js';
import { needTool } from './daemon.js';

/** Skip reason for a file-system test: not root, or a tool missing (never a skip in CI). */
export function needFilesystemTools(extra: Array<[string, string]> = []): string | undefined {
  if (process.getuid?.() !== 0) {
    if (process.env.CI) throw new Error('the file-system tests need root in CI');
    return 'needs root (nbdfuse + losetup + mount)';
  }
  for (const [tool, pkg] of [
    ['nbdfuse', 'libnbd-bin'],
    ['losetup', 'mount'],
    ['mkfs.ext4', 'e2fsprogs'],
    ['e2fsck', 'e2fsprogs'],
    ['fusermount3', 'fuse3'],
    ...extra,
  ] as const) {
    const why = needTool(tool, pkg);
    if (why) return why;
  }
  return undefined;
}

export class MountedExport {
  private constructor(
    readonly dir: string,
    readonly device: string,
    readonly mountpoint: string,
    private readonly fuse: ChildProcess,
  ) {}

  /** Attaches `nbd` (host:port, export 'volrep') as a loop device; `mkfs` makes ext4 on it first; mounts it. */
  static async attach(
    nbd: { host: string; port: number },
    dir: string,
    opts: { mkfs: boolean },
  ): Promise<MountedExport> {
    const fuseDir = path.join(dir, 'fuse');
    const mountpoint = path.join(dir, 'mnt');
    mkdirSync(fuseDir, { recursive: true });
    mkdirSync(mountpoint, { recursive: true });
    const file = path.join(fuseDir, 'disk');
    const fuse = spawn('nbdfuse', [file, `nbd://${nbd.host}:${nbd.port}/volrep`], { stdio: 'ignore' });
    await waitFor(() => existsSync(file), 'nbdfuse to expose the export', 10_000);
    const loop = await run('losetup', ['--find', '--show', file], { timeout: 10_000 });
    assert.equal(loop.code, 0, describeRun('losetup', loop));
    const device = loop.stdout.trim();
    if (opts.mkfs) {
      // No discard of the whole device first: it would write (trim) every region.
      const mk = await run('mkfs.ext4', ['-q', '-F', '-E', 'nodiscard', device], { timeout: 60_000 });
      assert.equal(mk.code, 0, describeRun('mkfs.ext4', mk));
    }
    const m = await run('mount', [device, mountpoint], { timeout: 60_000 });
    assert.equal(m.code, 0, describeRun('mount', m));
    return new MountedExport(dir, device, mountpoint, fuse);
  }

  private detached = false;

  /** Unmounts (cleanly when `clean`, else lazily), detaches the loop device, stops nbdfuse. Once. */
  async detach(clean = true): Promise<void> {
    if (this.detached) return;
    this.detached = true;
    const u = await run('umount', clean ? [this.mountpoint] : ['-l', this.mountpoint], { timeout: 30_000 });
    if (clean) assert.equal(u.code, 0, describeRun('umount', u));
    await run('losetup', ['-d', this.device], { timeout: 10_000 });
    await run('fusermount3', ['-u', '-z', path.join(this.dir, 'fuse')], { timeout: 10_000 });
    if (this.fuse.exitCode === null) this.fuse.kill('SIGKILL');
  }
}
