/**
 * Several NBD connections to one `volrep primary` at once: connections held open by a client, two
 * qemu-io writers and a qemu-io reader on disjoint ranges, and a multi-connection nbdcopy, all in
 * parallel; every one must succeed and the volume file must hold what each wrote.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { NbdClient } from '../../src/nbd/client.js';
import {
  createVolumeCli,
  describeRun,
  firstByteNot,
  httpRequest,
  metricValue,
  qemuIo,
  readRange,
  run,
  waitFor,
} from '../helpers/clients.js';
import { type Daemon, needTool, startPrimary, tempDir } from '../helpers/daemon.js';

const M = 1024 * 1024;

const skip = needTool('qemu-io', 'qemu-utils') ?? needTool('nbdcopy', 'libnbd-bin');

describe('concurrent connections to volrep primary', { skip, timeout: 90_000 }, () => {
  let tmp: ReturnType<typeof tempDir>;
  let volume: string;
  let daemon: Daemon | undefined;
  const clients: NbdClient[] = [];

  before(async () => {
    tmp = tempDir();
    volume = createVolumeCli(tmp.dir, 'multi.img', '64M');
    daemon = await startPrimary(volume, { http: true });
  });

  after(async () => {
    for (const c of clients) await c.close().catch(() => {});
    await daemon?.kill();
    tmp?.cleanup();
  });

  const status = async () =>
    JSON.parse((await httpRequest(daemon!.http!, '/status')).body) as { nbd: { connections: number } };

  it('qemu-io writers, a qemu-io reader, nbdcopy and held-open clients all succeed in parallel', async () => {
    // A range written beforehand, for the reader and for nbdcopy to check.
    const pre = await qemuIo(daemon!.nbd.uri, [`write -P 0x33 ${32 * M} ${16 * M}`]);
    assert.equal(pre.code, 0, describeRun('qemu-io prewrite', pre));

    for (let i = 0; i < 3; i++)
      clients.push(await NbdClient.connect(daemon!.nbd.host, daemon!.nbd.port, 'volrep'));
    await waitFor(async () => (await status()).nbd.connections === 3, '3 open connections in /status');

    const writer = (base: number, pattern: number) => {
      const cmds: string[] = [];
      for (let i = 0; i < 16; i++) cmds.push(`write -P 0x${pattern.toString(16)} ${base + i * M} ${M}`);
      for (let i = 0; i < 16; i++) cmds.push(`read -P 0x${pattern.toString(16)} ${base + i * M} ${M}`);
      return qemuIo(daemon!.nbd.uri, cmds, ['-t', 'writeback']);
    };
    const reader = () => {
      const cmds: string[] = [];
      for (let i = 0; i < 32; i++) cmds.push(`read -P 0x33 ${32 * M + i * 512 * 1024} ${512 * 1024}`);
      return qemuIo(daemon!.nbd.uri, cmds, ['-r']);
    };
    // The held-open clients write random data to disjoint 4 MiB slices of [48M, 60M), pipelined.
    const written: Buffer[] = [];
    const viaClient = async (c: NbdClient, slot: number) => {
      const data = randomBytes(4 * M);
      written[slot] = data;
      const base = 48 * M + slot * 4 * M;
      await Promise.all(
        Array.from({ length: 64 }, (_, i) =>
          c.write(base + i * 64 * 1024, data.subarray(i * 65536, (i + 1) * 65536)),
        ),
      );
      await c.flush();
      const back = await c.read(base, 4 * M);
      assert.ok(back.equals(data), `client ${slot} read back differs`);
    };
    const copied = path.join(tmp.dir, 'out.bin');

    const [a, b, r, copy] = await Promise.all([
      writer(0, 0x11),
      writer(16 * M, 0x22),
      reader(),
      run('nbdcopy', ['--connections=4', daemon!.nbd.uri, copied]),
      ...clients.map((c, i) => viaClient(c, i)),
    ]);
    assert.equal(a.code, 0, describeRun('qemu-io writer A', a));
    assert.equal(b.code, 0, describeRun('qemu-io writer B', b));
    assert.equal(r.code, 0, describeRun('qemu-io reader', r));
    assert.equal(copy.code, 0, describeRun('nbdcopy out', copy));
    for (const x of [a, b, r]) assert.doesNotMatch(x.stdout, /Pattern verification failed/);

    assert.equal(firstByteNot(readRange(volume, 0, 16 * M), 0x11), -1, 'range A in the file');
    assert.equal(firstByteNot(readRange(volume, 16 * M, 16 * M), 0x22), -1, 'range B in the file');
    assert.equal(firstByteNot(readRange(volume, 32 * M, 16 * M), 0x33), -1, 'prewritten range in the file');
    for (let slot = 0; slot < 3; slot++) {
      assert.ok(
        readRange(volume, 48 * M + slot * 4 * M, 4 * M).equals(written[slot]),
        `client slice ${slot}`,
      );
    }
    assert.equal(firstByteNot(readRange(volume, 60 * M, 4 * M), 0), -1, 'the untouched tail stays zero');
    // nbdcopy ran while the others wrote: only the range nobody wrote is predictable.
    assert.equal(
      firstByteNot(readRange(copied, 32 * M, 16 * M), 0x33),
      -1,
      'nbdcopy copy of the static range',
    );

    const metrics = (await httpRequest(daemon!.http!, '/metrics')).body;
    for (const command of ['read', 'write', 'flush']) {
      assert.equal(metricValue(metrics, 'volrep_nbd_requests_total', { command, result: 'error' }), 0);
    }
    assert.equal((await status()).nbd.connections, 3, 'only the held-open clients remain connected');
  });

  it('connections close cleanly and are counted down', async () => {
    for (const c of clients.splice(0)) await c.close();
    await waitFor(async () => (await status()).nbd.connections === 0, '0 connections in /status');
  });
});
