/**
 * Stopping `volrep primary` with SIGTERM / SIGINT: it must stop accepting, finish the requests in
 * flight, flush, release the volume lock, log "primary stopped" and exit 0, also while clients are
 * connected and mid-workload (fio, qemu-io, pipelined writes).
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { after, before, describe, it } from 'node:test';
import { NbdClient } from '../../src/nbd/client.js';
import {
  createVolumeCli,
  firstByteNot,
  httpRequest,
  metricValue,
  nbdRoundTrip,
  qemuIo,
  type RunResult,
  readRange,
  run,
  waitExit,
  waitFor,
} from '../helpers/clients.js';
import { type Daemon, needTool, startPrimary, tempDir } from '../helpers/daemon.js';

/** A graceful stop takes well under a second here; this only bounds a hang. */
const STOP_TIMEOUT_MS = 10_000;

/** Sends `signal` and asserts the graceful stop the README promises. */
async function stopGracefully(daemon: Daemon, volume: string, signal: NodeJS.Signals): Promise<void> {
  daemon.child.kill(signal);
  const { code, signal: killedBy } = await waitExit(daemon.child, STOP_TIMEOUT_MS);
  const log = daemon.stderr();
  assert.equal(killedBy, null, `the primary was killed by ${killedBy} instead of stopping\n${log}`);
  assert.equal(code, 0, `exit code\n${log}`);
  assert.match(log, new RegExp(`"${signal}: stopping"`), log);
  assert.match(log, /"primary stopped"/, `the stop did not complete (no "primary stopped")\n${log}`);
  assert.doesNotMatch(log, /"nbd request failed"/, log);
  assert.equal(existsSync(`${volume}.volrep/lock`), false, `the volume lock must be released\n${log}`);
}

const writesOk = async (daemon: Daemon) =>
  metricValue((await httpRequest(daemon.http!, '/metrics')).body, 'volrep_nbd_requests_total', {
    command: 'write',
    result: 'ok',
  }) ?? 0;

describe('stopping volrep primary with signals', { timeout: 120_000 }, () => {
  let tmp: ReturnType<typeof tempDir>;
  const daemons: Daemon[] = [];
  before(() => {
    tmp = tempDir();
  });
  after(async () => {
    for (const d of daemons) await d.kill();
    tmp?.cleanup();
  });

  it('SIGTERM right after the ready line stops gracefully (5 times)', async () => {
    const volume = createVolumeCli(tmp.dir, 'early.img', '1M');
    for (let i = 0; i < 5; i++) {
      const d = await startPrimary(volume);
      daemons.push(d);
      await stopGracefully(d, volume, 'SIGTERM');
    }
  });

  for (const signal of ['SIGTERM', 'SIGINT'] as const) {
    it(`${signal} with an idle client connected: exit 0, client disconnected`, async () => {
      const volume = createVolumeCli(tmp.dir, `idle-${signal}.img`, '4M');
      const d = await startPrimary(volume);
      daemons.push(d);
      await nbdRoundTrip(d);
      const client = await NbdClient.connect(d.nbd.host, d.nbd.port, 'volrep');
      await client.write(0, Buffer.alloc(4096, 0x42));
      await stopGracefully(d, volume, signal);
      await assert.rejects(client.read(0, 4096), /closed|EPIPE|ECONNRESET/);
      assert.equal(firstByteNot(readRange(volume, 0, 4096), 0x42), -1);
    });
  }

  it('SIGINT while pipelined FUA writes are in flight: they finish and are on disk, exit 0', async () => {
    // Small FUA writes, fewer than the 256 a connection may have in flight: they arrive together and
    // then wait for their fdatasync. The signal goes out from the first completion, so the rest are
    // in flight. Should a fast disk complete them all within that turn, the run proves nothing about
    // in-flight requests and is repeated (at most 3 runs); every run checks everything else.
    const COUNT = 240;
    const LENGTH = 16 * 1024;
    let completedAfterSignal = 0;
    for (let run = 0; run < 3 && completedAfterSignal === 0; run++) {
      const volume = createVolumeCli(tmp.dir, `inflight-${run}.img`, '4M');
      const d = await startPrimary(volume);
      daemons.push(d);
      await nbdRoundTrip(d);
      const client = await NbdClient.connect(d.nbd.host, d.nbd.port, 'volrep');
      let signalled = false;
      let stopped: Promise<unknown> | undefined;
      const results = Array.from({ length: COUNT }, (_, i) =>
        client.write(i * LENGTH, Buffer.alloc(LENGTH, i + 1), true).then(
          () => {
            const afterSignal = signalled;
            if (!signalled) {
              signalled = true;
              // Checked last, so that the in-flight assertions below run even if the stop is faulty.
              stopped = stopGracefully(d, volume, 'SIGINT').then(
                () => undefined,
                (err: unknown) => err,
              );
            }
            return { i, ok: true, afterSignal, err: undefined };
          },
          (err: Error & { nbdError?: number }) => ({ i, ok: false, afterSignal: true, err }),
        ),
      );
      const settled = await Promise.all(results);
      for (const r of settled) {
        if (r.ok) continue;
        assert.equal(r.err?.nbdError, undefined, `write ${r.i} got an NBD error reply: ${r.err?.message}`);
      }
      const done = settled.filter((r) => r.ok);
      for (const r of done) {
        assert.equal(
          firstByteNot(readRange(volume, r.i * LENGTH, LENGTH), r.i + 1),
          -1,
          `write ${r.i} on disk`,
        );
      }
      const stopError = await stopped;
      if (stopError) throw stopError;
      completedAfterSignal = done.filter((r) => r.afterSignal).length;
    }
    assert.ok(completedAfterSignal > 0, 'in 3 runs, no request in flight at the signal completed');
  });

  it('SIGTERM while fio runs a mixed workload: in-flight requests finish, exit 0', {
    skip: needTool('fio', 'fio'),
  }, async () => {
    const volume = createVolumeCli(tmp.dir, 'fio.img', '64M');
    const d = await startPrimary(volume, { http: true });
    daemons.push(d);
    const fio: Promise<RunResult> = run(
      'fio',
      [
        '--name=busy',
        '--ioengine=nbd',
        `--uri=${d.nbd.uri}`,
        '--rw=randrw',
        '--bsrange=4k-128k',
        '--iodepth=32',
        '--size=64M',
        '--time_based',
        '--runtime=30',
        '--verify_state_save=0',
      ],
      { cwd: tmp.dir, timeout: 60_000 },
    );
    try {
      await waitFor(async () => (await writesOk(d)) > 500, 'fio to have written through volrep', 15_000);
      await stopGracefully(d, volume, 'SIGTERM');
    } finally {
      const f = await fio;
      // fio loses its server mid-run; all that matters is that it ended (not hung, not killed by us).
      assert.notEqual(f.signal, 'SIGKILL', 'fio hung after the primary stopped');
    }
  });

  it('SIGINT while a long qemu-io command list runs: exit 0', {
    skip: needTool('qemu-io', 'qemu-utils'),
  }, async () => {
    const volume = createVolumeCli(tmp.dir, 'qemu.img', '64M');
    const d = await startPrimary(volume, { http: true });
    daemons.push(d);
    const cmds: string[] = [];
    for (let i = 0; i < 3000; i++) {
      cmds.push(`write -P 0x${((i % 200) + 1).toString(16)} ${(i % 512) * 128 * 1024} ${128 * 1024}`);
    }
    const qemu = qemuIo(d.nbd.uri, cmds, ['-t', 'writethrough']);
    try {
      await waitFor(async () => (await writesOk(d)) > 50, 'qemu-io to have written through volrep', 15_000);
      await stopGracefully(d, volume, 'SIGINT');
    } finally {
      const q = await qemu;
      assert.notEqual(q.signal, 'SIGKILL', 'qemu-io hung after the primary stopped');
    }
  });
});
