/**
 * qemu-io against a real `volrep primary`: pattern writes and reads verified with -P across region
 * boundaries (64 KiB regions), in writethrough (FUA) and writeback modes, write -z, discard and
 * flush, several commands per invocation, and the bytes in the volume file afterwards.
 */
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import {
  createVolumeCli,
  describeRun,
  expectFile,
  httpRequest,
  metricValue,
  qemuIo,
  type RunResult,
  readRange,
} from '../helpers/clients.js';
import { type Daemon, needTool, startPrimary, tempDir } from '../helpers/daemon.js';

const K = 1024;
const M = 1024 * 1024;

/** Asserts qemu-io succeeded and every command reported its bytes with no pattern mismatch. */
function expectOk(r: RunResult, what: string, done: { wrote?: number; read?: number; discard?: number }) {
  assert.equal(r.code, 0, describeRun(what, r));
  assert.doesNotMatch(r.stdout + r.stderr, /Pattern verification failed|error|failed/i, describeRun(what, r));
  for (const [verb, count] of Object.entries(done)) {
    const lines = r.stdout
      .split('\n')
      .filter((l) => new RegExp(`^${verb} \\d+/\\d+ bytes at offset \\d+$`).test(l));
    assert.equal(lines.length, count, `${what}: expected ${count} '${verb}' lines\n${r.stdout}`);
  }
}

const skip = needTool('qemu-io', 'qemu-utils');

describe('qemu-io against volrep primary', { skip, timeout: 90_000 }, () => {
  let tmp: ReturnType<typeof tempDir>;
  let volume: string;
  let daemon: Daemon | undefined;

  const metrics = async () => (await httpRequest(daemon!.http!, '/metrics')).body;
  const requests = (text: string, command: string) =>
    metricValue(text, 'volrep_nbd_requests_total', { command, result: 'ok' }) ?? Number.NaN;
  const errors = (text: string, command: string) =>
    metricValue(text, 'volrep_nbd_requests_total', { command, result: 'error' }) ?? Number.NaN;
  const bytes = (text: string, command: string) =>
    metricValue(text, 'volrep_nbd_bytes_total', { command }) ?? Number.NaN;

  before(async () => {
    tmp = tempDir();
    volume = createVolumeCli(tmp.dir, 'qemu.img', '64M');
    daemon = await startPrimary(volume, { http: true });
  });

  after(async () => {
    await daemon?.kill();
    tmp?.cleanup();
  });

  /** Writes three patterns crossing region boundaries at `base`, reads them back, checks the file. */
  async function crossBoundaryRoundTrip(base: number, p: number, cacheArgs: string[], what: string) {
    // A: 60K+8K crosses base+64K. B: 1K straddling base+192K. C: 200K from base+1M-512, over 4 boundaries.
    const a = { off: base + 60 * K, len: 8 * K, v: p };
    const b = { off: base + 192 * K - 512, len: 1 * K, v: p + 1 };
    const c = { off: base + M - 512, len: 200 * K, v: p + 2 };
    const hex = (v: number) => `0x${v.toString(16)}`;
    const r = await qemuIo(
      daemon!.nbd.uri,
      [
        `write -P ${hex(a.v)} ${a.off} ${a.len}`,
        `write -P ${hex(b.v)} ${b.off} ${b.len}`,
        `write -P ${hex(c.v)} ${c.off} ${c.len}`,
        `read -P ${hex(a.v)} ${a.off} ${a.len}`,
        `read -P ${hex(b.v)} ${b.off} ${b.len}`,
        `read -P ${hex(c.v)} ${c.off} ${c.len}`,
        `read -P 0 ${a.off - 4 * K} ${4 * K}`,
        `read -P 0 ${a.off + a.len} ${4 * K}`,
        `read -P 0 ${c.off + c.len} ${64 * K}`,
      ],
      cacheArgs,
    );
    expectOk(r, what, { wrote: 3, read: 6 });
    for (const x of [a, b, c]) expectFile(volume, x.off, x.len, x.v);
    expectFile(volume, a.off - 4 * K, 4 * K, 0);
    expectFile(volume, a.off + a.len, 4 * K, 0);
    expectFile(volume, b.off - 512, 512, 0);
    expectFile(volume, b.off + b.len, 512, 0);
    expectFile(volume, c.off - 512, 512, 0);
    expectFile(volume, c.off + c.len, 64 * K, 0);
  }

  it('writethrough (FUA) pattern writes across region boundaries read back and land in the file', async () => {
    const before = await metrics();
    await crossBoundaryRoundTrip(0, 0xa1, ['-t', 'writethrough'], 'qemu-io -t writethrough');
    const now = await metrics();
    assert.equal(requests(now, 'write') - requests(before, 'write'), 3);
    assert.equal(bytes(now, 'write') - bytes(before, 'write'), 8 * K + 1 * K + 200 * K);
    assert.equal(errors(now, 'write') - errors(before, 'write'), 0);
  });

  it('writeback (-t writeback) pattern writes across region boundaries', async () => {
    await crossBoundaryRoundTrip(4 * M, 0xb1, ['-t', 'writeback'], 'qemu-io -t writeback');
  });

  it('default cache mode pattern writes across region boundaries', async () => {
    await crossBoundaryRoundTrip(8 * M, 0xc1, [], 'qemu-io (default cache mode)');
  });

  it('a wrong pattern makes qemu-io fail (the -P checks can fail)', async () => {
    const r = await qemuIo(daemon!.nbd.uri, [`read -P 0x5a ${12 * M} 4096`]);
    assert.notEqual(r.code, 0, describeRun('qemu-io read of a wrong pattern', r));
    assert.match(r.stdout + r.stderr, /Pattern verification failed/);
  });

  it('write -z zeroes ranges across boundaries, small and large, with and without -u', async () => {
    const base = 16 * M;
    const before = await metrics();
    const r = await qemuIo(
      daemon!.nbd.uri,
      [
        `write -P 0xd1 ${base - 8 * K} ${24 * K}`,
        `write -z ${base - 4 * K} ${8 * K}`,
        `write -P 0xd2 ${base + M} ${3 * M}`,
        `write -z -u ${base + M + 512} ${2 * M + 1024}`,
        `read -P 0xd1 ${base - 8 * K} ${4 * K}`,
        `read -P 0 ${base - 4 * K} ${8 * K}`,
        `read -P 0xd1 ${base + 4 * K} ${12 * K}`,
        `read -P 0xd2 ${base + M} 512`,
        `read -P 0 ${base + M + 512} ${2 * M + 1024}`,
        `read -P 0xd2 ${base + 3 * M + 1536} ${M - 1536}`,
      ],
      ['-t', 'writeback'],
    );
    expectOk(r, 'qemu-io write -z', { wrote: 4, read: 6 });
    expectFile(volume, base - 8 * K, 4 * K, 0xd1);
    expectFile(volume, base - 4 * K, 8 * K, 0);
    expectFile(volume, base + 4 * K, 12 * K, 0xd1);
    expectFile(volume, base + M, 512, 0xd2);
    expectFile(volume, base + M + 512, 2 * M + 1024, 0);
    expectFile(volume, base + 3 * M + 1536, M - 1536, 0xd2);
    const now = await metrics();
    assert.equal(requests(now, 'write_zeroes') - requests(before, 'write_zeroes'), 2);
    assert.equal(bytes(now, 'write_zeroes') - bytes(before, 'write_zeroes'), 8 * K + 2 * M + 1024);
  });

  it('discard zeroes the trimmed ranges (read back -P 0, file holds zeroes)', async () => {
    const base = 24 * M;
    const before = await metrics();
    const r = await qemuIo(
      daemon!.nbd.uri,
      [
        `write -P 0xe1 ${base - 64 * K} ${192 * K}`,
        `discard ${base - 32 * K} ${64 * K}`,
        `write -P 0xe2 ${base + M} ${2 * M}`,
        `discard ${base + M + 4 * K} ${M + 512 * K}`,
        `read -P 0xe1 ${base - 64 * K} ${32 * K}`,
        `read -P 0 ${base - 32 * K} ${64 * K}`,
        `read -P 0xe1 ${base + 32 * K} ${96 * K}`,
        `read -P 0xe2 ${base + M} ${4 * K}`,
        `read -P 0 ${base + M + 4 * K} ${M + 512 * K}`,
        `read -P 0xe2 ${base + 2 * M + 516 * K} ${508 * K}`,
      ],
      ['-t', 'writethrough'],
    );
    expectOk(r, 'qemu-io discard', { wrote: 2, read: 6, discard: 2 });
    expectFile(volume, base - 64 * K, 32 * K, 0xe1);
    expectFile(volume, base - 32 * K, 64 * K, 0);
    expectFile(volume, base + 32 * K, 96 * K, 0xe1);
    expectFile(volume, base + M, 4 * K, 0xe2);
    expectFile(volume, base + M + 4 * K, M + 512 * K, 0);
    expectFile(volume, base + 2 * M + 516 * K, 508 * K, 0xe2);
    const now = await metrics();
    assert.equal(requests(now, 'trim') - requests(before, 'trim'), 2);
    assert.equal(bytes(now, 'trim') - bytes(before, 'trim'), 64 * K + M + 512 * K);
  });

  it('flush reaches the server and the data is in the file', async () => {
    const base = 32 * M;
    const before = await metrics();
    const r = await qemuIo(
      daemon!.nbd.uri,
      [
        `write -P 0xf1 ${base} ${64 * K}`,
        'flush',
        `write -P 0xf2 ${base + 64 * K} ${64 * K}`,
        'flush',
        `read -P 0xf1 ${base} ${64 * K}`,
        `read -P 0xf2 ${base + 64 * K} ${64 * K}`,
      ],
      ['-t', 'writeback'],
    );
    expectOk(r, 'qemu-io flush', { wrote: 2, read: 2 });
    expectFile(volume, base, 64 * K, 0xf1);
    expectFile(volume, base + 64 * K, 64 * K, 0xf2);
    const now = await metrics();
    assert.equal(requests(now, 'write') - requests(before, 'write'), 2);
    assert.ok(
      requests(now, 'flush') - requests(before, 'flush') >= 2,
      `expected at least 2 flushes, got ${requests(now, 'flush') - requests(before, 'flush')}`,
    );
    assert.equal(errors(now, 'flush') - errors(before, 'flush'), 0);
  });

  it('a single-byte write at an odd offset (block size minimum 1)', async () => {
    const off = 40 * M + 64 * K - 1;
    const r = await qemuIo(daemon!.nbd.uri, [
      `write -P 0x77 ${off} 2`,
      `read -P 0x77 ${off} 2`,
      `read -P 0 ${off - 1} 1`,
      `read -P 0 ${off + 2} 1`,
    ]);
    expectOk(r, 'qemu-io unaligned write', { wrote: 1, read: 3 });
    assert.deepEqual([...readRange(volume, off - 1, 4)], [0, 0x77, 0x77, 0]);
  });
});
