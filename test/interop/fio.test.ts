/**
 * fio's nbd engine against a real `volrep primary`: short mixed random read/write jobs with crc32c
 * verification, fixed 4k blocks and a 4k-128k range, at queue depths 16 and 32.
 */
import assert from 'node:assert/strict';
import { closeSync, openSync, readSync, writeSync } from 'node:fs';
import { after, before, describe, it } from 'node:test';
import { createVolumeCli, describeRun, httpRequest, metricValue, run } from '../helpers/clients.js';
import { type Daemon, needTool, startPrimary, tempDir } from '../helpers/daemon.js';

interface FioJob {
  jobname: string;
  error: number;
  read: { io_bytes: number; total_ios: number };
  write: { io_bytes: number; total_ios: number };
}

/** fio's nbd engine prints "fio: connected to NBD server" before the JSON. */
function parseFio(stdout: string): { jobs: FioJob[] } {
  const at = stdout.indexOf('{');
  assert.ok(at >= 0, `no JSON in fio output:\n${stdout}`);
  return JSON.parse(stdout.slice(at)) as { jobs: FioJob[] };
}

const skip = needTool('fio', 'fio');

describe('fio --ioengine=nbd against volrep primary', { skip, timeout: 90_000 }, () => {
  let tmp: ReturnType<typeof tempDir>;
  let volume: string;
  let daemon: Daemon | undefined;

  before(async () => {
    tmp = tempDir();
    volume = createVolumeCli(tmp.dir, 'fio.img', '128M');
    daemon = await startPrimary(volume, { http: true });
  });

  after(async () => {
    await daemon?.kill();
    tmp?.cleanup();
  });

  async function fioVerify(name: string, args: string[]): Promise<FioJob> {
    const r = await run(
      'fio',
      [
        `--name=${name}`,
        '--ioengine=nbd',
        `--uri=${daemon!.nbd.uri}`,
        '--rw=randrw',
        '--verify=crc32c',
        '--verify_fatal=1',
        '--verify_state_save=0',
        '--size=64M',
        '--runtime=10',
        '--output-format=json',
        ...args,
      ],
      { cwd: tmp.dir, timeout: 60_000 },
    );
    assert.equal(r.code, 0, describeRun(`fio ${name}`, r));
    assert.doesNotMatch(r.stderr, /verify|bad magic|crc32c/i, describeRun(`fio ${name}`, r));
    const job = parseFio(r.stdout).jobs[0];
    assert.equal(job.error, 0, `fio job error ${job.error}`);
    assert.ok(job.write.io_bytes > 0, 'fio must have written');
    assert.ok(job.read.io_bytes > 0, 'fio must have read (and verified)');
    return job;
  }

  it('randrw 4k at iodepth 16 verifies with crc32c', async () => {
    const before = (await httpRequest(daemon!.http!, '/metrics')).body;
    const job = await fioVerify('randrw-4k', ['--bs=4k', '--iodepth=16']);
    const after = (await httpRequest(daemon!.http!, '/metrics')).body;
    const writes =
      (metricValue(after, 'volrep_nbd_requests_total', { command: 'write', result: 'ok' }) ?? 0) -
      (metricValue(before, 'volrep_nbd_requests_total', { command: 'write', result: 'ok' }) ?? 0);
    assert.equal(writes, job.write.total_ios, 'every fio write must have reached volrep');
    for (const command of ['read', 'write']) {
      assert.equal(
        metricValue(after, 'volrep_nbd_requests_total', { command, result: 'error' }),
        0,
        `no ${command} may fail`,
      );
    }
  });

  it('randrw 4k-128k at iodepth 32 verifies with crc32c', async () => {
    await fioVerify('randrw-range', ['--bsrange=4k-128k', '--iodepth=32']);
  });

  it('two fio jobs at once on disjoint halves verify', async () => {
    const jobs = await Promise.all([
      fioVerify('half-a', ['--bsrange=4k-64k', '--iodepth=16', '--size=32M', '--offset=0']),
      fioVerify('half-b', ['--bsrange=4k-64k', '--iodepth=16', '--size=32M', '--offset=64M']),
    ]);
    assert.equal(jobs.length, 2);
  });

  it('data fio wrote verifies from a later connection, and a flipped byte in the file is caught', async () => {
    const common = [
      '--name=persist',
      '--ioengine=nbd',
      `--uri=${daemon!.nbd.uri}`,
      '--rw=write',
      '--bs=64k',
      '--iodepth=16',
      '--offset=96M',
      '--size=16M',
      '--verify=crc32c',
      '--verify_state_save=0',
    ];
    const write = await run('fio', [...common, '--do_verify=0'], { cwd: tmp.dir, timeout: 60_000 });
    assert.equal(write.code, 0, describeRun('fio write', write));
    const verify = await run('fio', [...common, '--verify_only'], { cwd: tmp.dir, timeout: 60_000 });
    assert.equal(verify.code, 0, describeRun('fio --verify_only', verify));

    // Flip one byte of the volume file inside that range: the same verification must now fail.
    const at = 96 * 1024 * 1024 + 5 * 65536 + 1000;
    const fd = openSync(volume, 'r+');
    try {
      const b = Buffer.alloc(1);
      readSync(fd, b, 0, 1, at);
      b[0] ^= 0xff;
      writeSync(fd, b, 0, 1, at);
    } finally {
      closeSync(fd);
    }
    const corrupt = await run('fio', [...common, '--verify_only'], { cwd: tmp.dir, timeout: 60_000 });
    assert.notEqual(corrupt.code, 0, describeRun('fio --verify_only of a corrupted volume', corrupt));
  });
});
