/**
 * Bulk copies through a real `volrep primary`: nbdcopy of a 256 MiB random file in and back out
 * (SHA-256 of source, volume file and copy must match), and qemu-img convert in and out.
 */
import assert from 'node:assert/strict';
import { createHash, randomFillSync } from 'node:crypto';
import { closeSync, ftruncateSync, openSync, statSync, writeSync } from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { createVolumeCli, describeRun, run, sha256File, sha256Range } from '../helpers/clients.js';
import { type Daemon, needTool, startPrimary, tempDir } from '../helpers/daemon.js';

const M = 1024 * 1024;
const SIZE = 256 * M;

/**
 * Writes `size` bytes to `file`: random data in every chunk for which `dataChunk(i)` is true, holes
 * (zeroes) elsewhere. Returns the SHA-256 of the content.
 */
function writeRandomFile(
  file: string,
  size: number,
  chunk: number,
  dataChunk: (i: number) => boolean,
): string {
  const hash = createHash('sha256');
  const buf = Buffer.alloc(chunk);
  const zero = Buffer.alloc(chunk);
  const fd = openSync(file, 'w');
  try {
    ftruncateSync(fd, size);
    for (let i = 0; i * chunk < size; i++) {
      const n = Math.min(chunk, size - i * chunk);
      if (dataChunk(i)) {
        randomFillSync(buf, 0, n);
        writeSync(fd, buf, 0, n, i * chunk);
        hash.update(buf.subarray(0, n));
      } else {
        hash.update(zero.subarray(0, n));
      }
    }
  } finally {
    closeSync(fd);
  }
  return hash.digest('hex');
}

const skip =
  needTool('nbdcopy', 'libnbd-bin') ??
  needTool('qemu-img', 'qemu-utils') ??
  needTool('nbdinfo', 'libnbd-bin');

describe('bulk copies through volrep primary', { skip, timeout: 120_000 }, () => {
  let tmp: ReturnType<typeof tempDir>;
  let volume: string;
  let daemon: Daemon | undefined;

  before(async () => {
    tmp = tempDir();
    volume = createVolumeCli(tmp.dir, 'copy.img', '256M');
    daemon = await startPrimary(volume);
  });

  after(async () => {
    await daemon?.kill();
    tmp?.cleanup();
  });

  it('nbdcopy of a 256 MiB random file in and out is byte-identical', async () => {
    const source = path.join(tmp.dir, 'source.bin');
    const copied = path.join(tmp.dir, 'copied-out.bin');
    const want = writeRandomFile(source, SIZE, 8 * M, () => true);

    const into = await run('nbdcopy', ['--flush', source, daemon!.nbd.uri]);
    assert.equal(into.code, 0, describeRun('nbdcopy into the export', into));
    assert.equal(await sha256File(volume), want, 'volume file differs from the source');
    assert.equal(statSync(volume).size, SIZE, 'the volume file must keep its size');

    const out = await run('nbdcopy', [daemon!.nbd.uri, copied]);
    assert.equal(out.code, 0, describeRun('nbdcopy out of the export', out));
    assert.equal(statSync(copied).size, SIZE);
    assert.equal(await sha256File(copied), want, 'copied-out file differs from the source');
  });

  it('nbdcopy with a single connection and small requests is byte-identical too', async () => {
    const source = path.join(tmp.dir, 'source-small.bin');
    const want = writeRandomFile(source, 32 * M, M, () => true);
    const tailBefore = await sha256Range(volume, 32 * M, SIZE);
    // The export is larger than the source: nbdcopy writes only the first 32 MiB.
    const into = await run('nbdcopy', ['--connections=1', '--request-size=65536', source, daemon!.nbd.uri]);
    assert.equal(into.code, 0, describeRun('nbdcopy -C 1', into));
    assert.equal(await sha256Range(volume, 0, 32 * M), want);
    assert.equal(
      await sha256Range(volume, 32 * M, SIZE),
      tailBefore,
      'bytes past the copy must be untouched',
    );
  });

  it('qemu-img convert -n -O raw of a file with zero runs into the export, and back out', async () => {
    const source = path.join(tmp.dir, 'convert.raw');
    // 32 MiB: 1 MiB of random data, then 1 MiB of zeroes (a hole), alternating; qemu-img writes the
    // zero runs as zero requests, which must overwrite what the volume held there.
    const want = writeRandomFile(source, 32 * M, M, (i) => i % 2 === 0);
    const tailBefore = await sha256Range(volume, 32 * M, SIZE);
    const convert = await run('qemu-img', [
      'convert',
      '-n',
      '-f',
      'raw',
      '-O',
      'raw',
      source,
      daemon!.nbd.uri,
    ]);
    assert.equal(convert.code, 0, describeRun('qemu-img convert into the export', convert));
    assert.equal(await sha256Range(volume, 0, 32 * M), want, 'the first 32 MiB must equal the source');
    assert.equal(
      await sha256Range(volume, 32 * M, SIZE),
      tailBefore,
      'bytes past the copy must be untouched',
    );

    const outFile = path.join(tmp.dir, 'converted-out.raw');
    const out = await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', daemon!.nbd.uri, outFile]);
    assert.equal(out.code, 0, describeRun('qemu-img convert out of the export', out));
    assert.equal(statSync(outFile).size, SIZE);
    assert.equal(await sha256File(outFile), await sha256File(volume));

    const compare = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', volume, daemon!.nbd.uri]);
    assert.equal(compare.code, 0, describeRun('qemu-img compare volume file vs export', compare));
  });
});
