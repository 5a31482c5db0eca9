/**
 * nbdinfo (libnbd) against a real `volrep primary`: export size and flags, --list, --map, and the
 * --read-only export refusing writes (qemu-io and a raw NBD WRITE) while it keeps serving.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { NbdClient } from '../../src/nbd/client.js';
import * as P from '../../src/nbd/protocol.js';
import { createVolumeCli, describeRun, firstByteNot, qemuIo, readRange, run } from '../helpers/clients.js';
import { type Daemon, needTool, startPrimary, tempDir } from '../helpers/daemon.js';

const SIZE = 64 * 1024 * 1024;

interface NbdinfoExport {
  'export-name': string;
  'export-size': number;
  description?: string;
  is_read_only: boolean;
  can_flush: boolean;
  can_fua: boolean;
  can_trim: boolean;
  can_zero: boolean;
  can_multi_conn: boolean;
  block_size_minimum?: number;
  block_size_preferred?: number;
  block_size_maximum?: number;
  contexts?: string[];
}

interface NbdinfoJson {
  protocol: string;
  structured: boolean;
  exports: NbdinfoExport[];
}

async function nbdinfoJson(args: string[]): Promise<NbdinfoJson> {
  const r = await run('nbdinfo', ['--json', ...args]);
  assert.equal(r.code, 0, describeRun('nbdinfo --json', r));
  return JSON.parse(r.stdout) as NbdinfoJson;
}

const skip = needTool('nbdinfo', 'libnbd-bin') ?? needTool('qemu-io', 'qemu-utils');

describe('nbdinfo against volrep primary', { skip, timeout: 60_000 }, () => {
  let tmp: ReturnType<typeof tempDir>;
  let volume: string;
  let daemon: Daemon | undefined;

  before(async () => {
    tmp = tempDir();
    volume = createVolumeCli(tmp.dir, 'rw.img', '64M');
    daemon = await startPrimary(volume);
  });

  after(async () => {
    await daemon?.kill();
    tmp?.cleanup();
  });

  it('reports the size and the flags of a writable export', async () => {
    const info = await nbdinfoJson([daemon!.nbd.uri]);
    assert.equal(info.protocol, 'newstyle-fixed');
    assert.equal(info.structured, true);
    assert.equal(info.exports.length, 1);
    const e = info.exports[0];
    assert.equal(e['export-name'], 'volrep');
    assert.equal(e['export-size'], SIZE);
    assert.equal(e.is_read_only, false);
    assert.equal(e.can_flush, true);
    assert.equal(e.can_fua, true);
    assert.equal(e.can_trim, true);
    assert.equal(e.can_zero, true);
    assert.equal(e.can_multi_conn, true);
    assert.equal(e.block_size_minimum, 1);
    assert.equal(e.block_size_preferred, 4096);
    assert.equal(e.block_size_maximum, 32 * 1024 * 1024);
    assert.deepEqual(e.contexts, ['base:allocation']);
  });

  it('answers to the empty export name too, and refuses an unknown one', async () => {
    const info = await nbdinfoJson([`nbd://${daemon!.nbd.host}:${daemon!.nbd.port}/`]);
    assert.equal(info.exports[0]['export-size'], SIZE);
    const bad = await run('nbdinfo', [`nbd://${daemon!.nbd.host}:${daemon!.nbd.port}/nosuchexport`]);
    assert.notEqual(bad.code, 0, describeRun('nbdinfo of an unknown export', bad));
  });

  it('--list shows the export', async () => {
    const r = await run('nbdinfo', ['--list', `nbd://${daemon!.nbd.host}:${daemon!.nbd.port}/`]);
    assert.equal(r.code, 0, describeRun('nbdinfo --list', r));
    assert.match(r.stdout, /^export="volrep":$/m);
    assert.match(r.stdout, /export-size: 67108864\b/);
    const j = await nbdinfoJson(['--list', `nbd://${daemon!.nbd.host}:${daemon!.nbd.port}/`]);
    assert.deepEqual(
      j.exports.map((e) => e['export-name']),
      ['volrep'],
    );
    assert.equal(j.exports[0]['export-size'], SIZE);
  });

  it('--map reports the whole export as allocated data', async () => {
    const r = await run('nbdinfo', ['--map', daemon!.nbd.uri]);
    assert.equal(r.code, 0, describeRun('nbdinfo --map', r));
    const rows = r.stdout
      .trim()
      .split('\n')
      .map((l) => l.trim().split(/\s+/));
    assert.deepEqual(rows, [['0', String(SIZE), '0', 'data']]);
    const totals = await run('nbdinfo', ['--map', '--totals', daemon!.nbd.uri]);
    assert.equal(totals.code, 0, describeRun('nbdinfo --map --totals', totals));
    assert.match(totals.stdout, new RegExp(`^\\s*${SIZE}\\s+100\\.0%\\s+0\\s+data`, 'm'));
  });
});

describe('volrep primary --read-only', { skip, timeout: 60_000 }, () => {
  let tmp: ReturnType<typeof tempDir>;
  let volume: string;
  let daemon: Daemon | undefined;

  before(async () => {
    tmp = tempDir();
    volume = createVolumeCli(tmp.dir, 'ro.img', '64M');
    daemon = await startPrimary(volume, { extra: ['--read-only'] });
  });

  after(async () => {
    await daemon?.kill();
    tmp?.cleanup();
  });

  it('advertises a read-only export without trim or zero', async () => {
    const e = (await nbdinfoJson([daemon!.nbd.uri])).exports[0];
    assert.equal(e['export-size'], SIZE);
    assert.equal(e.is_read_only, true);
    assert.equal(e.can_trim, false);
    assert.equal(e.can_zero, false);
  });

  it('a qemu-io write fails with a permission error and the server keeps serving', async () => {
    const w = await qemuIo(daemon!.nbd.uri, ['write -P 0xcd 0 4096']);
    assert.notEqual(w.code, 0, describeRun('qemu-io write to a read-only export', w));
    assert.match(w.stdout + w.stderr, /Permission denied|Operation not permitted/);
    assert.equal(firstByteNot(readRange(volume, 0, 4096), 0), -1, 'the volume must still be zero');

    const r = await qemuIo(daemon!.nbd.uri, ['read -P 0 0 65536'], ['-r']);
    assert.equal(r.code, 0, describeRun('qemu-io -r read after the refused write', r));
    assert.equal(daemon!.child.exitCode, null, 'the daemon must still be running');
  });

  it('a raw NBD WRITE gets EPERM and the connection stays usable', async () => {
    const client = await NbdClient.connect(daemon!.nbd.host, daemon!.nbd.port, 'volrep');
    try {
      assert.equal(client.size, SIZE);
      assert.ok((client.flags & P.TFLAG_READ_ONLY) !== 0, 'READ_ONLY flag must be set');
      await assert.rejects(
        client.write(4096, Buffer.alloc(4096, 0xee)),
        (err: Error & { nbdError?: number }) => {
          assert.equal(err.nbdError, P.EPERM);
          return true;
        },
      );
      await assert.rejects(client.writeZeroes(0, 4096), (err: Error & { nbdError?: number }) => {
        assert.equal(err.nbdError, P.EPERM);
        return true;
      });
      await assert.rejects(client.trim(0, 4096), (err: Error & { nbdError?: number }) => {
        assert.equal(err.nbdError, P.EPERM);
        return true;
      });
      const data = await client.read(4096, 4096);
      assert.equal(firstByteNot(data, 0), -1);
    } finally {
      await client.close();
    }
    assert.equal(firstByteNot(readRange(volume, 0, 8192), 0), -1, 'the volume must still be zero');
    const info = await nbdinfoJson([daemon!.nbd.uri]);
    assert.equal(info.exports[0].is_read_only, true);
  });
});
