/**
 * A real primary/secondary pair end to end: the full initial sync of a primary volume that already
 * holds data, then qemu-io writes, an nbdcopy of a random 64 MiB file and a short fio verify job
 * through the primary; once in sync, volume and replica are byte-identical. And --assume-clean on
 * two fresh volumes: no resync bytes, the replica becomes consistent, and stays identical.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { closeSync, openSync, writeFileSync, writeSync } from 'node:fs';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { describeRun, qemuIo, readRange, run, sha256File, sha256Range } from '../helpers/clients.js';
import { needTool, volrep } from '../helpers/daemon.js';
import { Pair } from './pair.js';

const MiB = 1024 * 1024;
const skip = needTool('qemu-io', 'qemu-utils') ?? needTool('nbdcopy', 'libnbd-bin') ?? needTool('fio', 'fio');

describe('pair end to end', { skip, timeout: 180_000 }, () => {
  const pairs: Pair[] = [];
  after(async () => {
    for (const p of pairs) await p.cleanup();
  });

  it('full initial sync, then qemu-io, nbdcopy and fio: volume and replica identical', async () => {
    const pair = new Pair({ size: '128M' });
    pairs.push(pair);
    // Content on the primary volume before the pair ever runs: the initial sync must carry it.
    const fd = openSync(pair.primaryVolume, 'r+');
    try {
      for (const at of [0, 5 * MiB + 12345, 40 * MiB, 127 * MiB]) writeSync(fd, randomBytes(MiB), 0, MiB, at);
    } finally {
      closeSync(fd);
    }
    await pair.start();
    await pair.waitInSync('initial sync', 60_000);
    const resynced = await pair.primaryMetric('volrep_resync_bytes_total');
    assert.equal(resynced, 128 * MiB, 'the initial sync sends the whole volume');
    const sec = await pair.secondaryStatus();
    assert.equal(sec.consistent, true, JSON.stringify(sec));
    await pair.assertIdentical('after the initial sync');

    const uri = pair.primary!.nbd.uri;
    const q = await qemuIo(uri, [
      'write -P 0xab 0 1M',
      'write -P 0xcd 3000 70000',
      'write -z 2M 512k',
      'discard 40M 256k',
      'write -P 0x11 127M 1M',
      'flush',
    ]);
    assert.equal(q.code, 0, describeRun('qemu-io', q));
    assert.ok(readRange(pair.primaryVolume, 0, 3000).every((b) => b === 0xab));

    const source = path.join(pair.dir, 'random.bin');
    writeFileSync(source, randomBytes(64 * MiB));
    const copy = await run('nbdcopy', ['--flush', source, uri]);
    assert.equal(copy.code, 0, describeRun('nbdcopy', copy));
    assert.equal(
      await sha256Range(pair.primaryVolume, 0, 64 * MiB),
      await sha256File(source),
      'nbdcopy content on the primary volume',
    );

    const fio = await run(
      'fio',
      [
        '--name=pair-verify',
        '--ioengine=nbd',
        `--uri=${uri}`,
        '--rw=randrw',
        '--bs=4k',
        '--iodepth=16',
        '--offset=64M',
        '--size=32M',
        '--verify=crc32c',
        '--verify_fatal=1',
        '--verify_state_save=0',
        '--runtime=5',
        '--output-format=json',
      ],
      { cwd: pair.dir, timeout: 60_000 },
    );
    assert.equal(fio.code, 0, describeRun('fio', fio));

    await pair.waitInSync('after qemu-io, nbdcopy and fio', 60_000);
    assert.ok((await pair.primaryMetric('volrep_replicated_bytes_total')) >= 64 * MiB);
    await pair.assertIdentical('after qemu-io, nbdcopy and fio');
  });

  it('--assume-clean on two fresh volumes: no resync bytes, the replica becomes consistent', async () => {
    const pair = new Pair({ size: '64M', primaryExtra: ['--assume-clean'] });
    pairs.push(pair);
    await pair.start();
    await pair.waitInSync('assume-clean start', 20_000);
    assert.equal(await pair.primaryMetric('volrep_resync_bytes_total'), 0);
    const status = await pair.primaryStatus();
    assert.equal(status.replica.consistent, true, JSON.stringify(status));
    const sec = await pair.secondaryStatus();
    assert.equal(sec.consistent, true, JSON.stringify(sec));

    const q = await qemuIo(pair.primary!.nbd.uri, ['write -P 0x5a 1M 3M', 'write -P 0x6b 60M 17k']);
    assert.equal(q.code, 0, describeRun('qemu-io', q));
    await pair.waitInSync('assume-clean after writes', 20_000);
    assert.equal(await pair.primaryMetric('volrep_resync_bytes_total'), 0, 'still no resync');
    assert.ok((await pair.primaryMetric('volrep_replicated_bytes_total')) >= 3 * MiB + 17 * 1024);
    await pair.assertIdentical('assume-clean');

    // The replica is lost and re-created empty: --assume-clean spoke of the pair's birth only, so
    // this replica without history gets a full sync, not trust.
    await pair.secondary!.stop();
    const r = volrep([
      'create',
      '--volume',
      pair.secondaryVolume,
      '--size',
      '64M',
      '--secondary-of',
      pair.volumeId,
      '--force',
    ]);
    assert.equal(r.status, 0, r.stderr);
    writeFileSync(pair.secondaryVolume, randomBytes(64 * MiB));
    await pair.startSecondary();
    await pair.waitInSync('a re-created replica', 30_000);
    assert.equal(
      await pair.primaryMetric('volrep_resync_bytes_total'),
      64 * MiB,
      'a full sync of the re-created replica',
    );
    await pair.assertIdentical('re-created replica');
  });
});
