/**
 * Failover in async mode under a real file system: ext4 on the primary's NBD export (nbdfuse +
 * loop, as root), a writer of files with fsyncs, SIGKILL of the primary mid-workload, promotion of
 * the replica. The promoted replica must mount (ext4 replays its journal, as an application's
 * recovery would) and then pass `e2fsck -fn`; the files fsynced before the last ack are intact.
 * Prints how much was lost: bytes written but not acked at the kill, and regions that differ.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { describeRun, run, waitFor } from '../helpers/clients.js';
import { MountedExport, needFilesystemTools } from '../helpers/filesystem.js';
import { REGION, Sites } from './sites.js';

const skip = needFilesystemTools();

/** SIGKILL a process started with `detached: true` and everything in its process group. */
function killGroup(child: ChildProcess): void {
  try {
    process.kill(-child.pid!, 'SIGKILL');
  } catch {}
}

describe('failover, async mode, ext4 on the export', { skip, timeout: 240_000 }, () => {
  let sites: Sites;
  let writer: ChildProcess | undefined;
  const mounted: MountedExport[] = [];
  after(async () => {
    if (writer) killGroup(writer);
    for (const m of mounted) await m.detach(false);
    await sites?.cleanup();
  });

  it('the promoted replica mounts and passes e2fsck -fn; the loss is reported', async () => {
    sites = await Sites.create('128M');
    const { a, b } = sites;
    await sites.startSecondary(b);
    await sites.startPrimary(a);
    await sites.waitInSync(a, 'the initial sync');
    const fsA = await MountedExport.attach(a.primary!.nbd, path.join(sites.dir, 'fs-a'), { mkfs: true });
    mounted.push(fsA);
    // Files of 64 KiB, each fsynced, named by number, with a manifest line once the fsync returned.
    // Beside them, large files never fsynced: writeback keeps unacked bytes in flight at the kill.
    // Each loop ends at its first failed write (the export gone); the whole process group is
    // killed as well, so no loop outlives the test.
    const script =
      `(j=0; while head -c 4194304 /dev/urandom > big$((j % 8)); do j=$((j+1)); done) & ` +
      `i=0; while head -c 65536 /dev/urandom > f$i && sync f$i && sha256sum f$i >> manifest && sync manifest; do i=$((i+1)); done`;
    writer = spawn('sh', ['-c', script], { cwd: fsA.mountpoint, stdio: 'ignore', detached: true });
    // Mid-workload: once the writer has fsynced a few dozen files (however fast this machine is).
    const manifestA = path.join(fsA.mountpoint, 'manifest');
    await waitFor(
      () => existsSync(manifestA) && readFileSync(manifestA, 'utf8').split('\n').length > 30,
      'the writer to fsync 30 files',
      120_000,
      50,
    );
    const st = await sites.status(a);
    const unacked = st.pendingBytes as number;
    await sites.kill(a); // mid-workload
    killGroup(writer);
    await fsA.detach(false);
    const differing = sites.differing();

    await sites.stop(b);
    const p = sites.promote(b);
    assert.equal(p.status, 0, p.stderr);
    await sites.startPrimary(b);
    const fsB = await MountedExport.attach(b.primary!.nbd, path.join(sites.dir, 'fs-b'), { mkfs: false });
    mounted.push(fsB);
    // Every file the manifest names (its fsync returned before the manifest's) has its content.
    const manifest = readFileSync(path.join(fsB.mountpoint, 'manifest'), 'utf8').split('\n').filter(Boolean);
    let intact = 0;
    for (const line of manifest.slice(0, -1)) {
      const [sum, name] = line.split(/\s+/);
      const data = readFileSync(path.join(fsB.mountpoint, name));
      assert.equal(createHash('sha256').update(data).digest('hex'), sum, `${name} on the replica`);
      intact++;
    }
    assert.ok(intact > 0, 'no fsynced file reached the replica');
    await fsB.detach(true);
    await sites.stop(b);
    const fsck = await run('e2fsck', ['-fn', b.volume], { timeout: 120_000 });
    assert.equal(fsck.code, 0, describeRun('e2fsck -fn on the promoted replica', fsck));
    console.log(
      `failover async ext4: ${intact} fsynced files intact on the promoted replica; at the kill ${unacked} bytes were written ` +
        `but not acked; ${differing.length} regions (${differing.length * REGION} bytes) differed between the old primary and the replica`,
    );
  });
});
