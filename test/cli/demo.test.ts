/**
 * `volrep demo` as a process: it creates a primary and a replica, replicates a workload, cuts and
 * restores the link, resyncs, compares checksums, prints "demo OK", exits 0 and cleans up.
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { describe, it } from 'node:test';
import { assertUsageError, volrepAsync } from '../helpers/clients.js';

describe('volrep demo', { timeout: 90_000 }, () => {
  it('runs the default demo: "demo OK", matching hashes, a resync of only the dirty regions, exit 0, temp dir removed', async () => {
    const r = await volrepAsync(['demo'], 60_000);
    assert.equal(r.code, 0, `exit ${r.code} signal ${r.signal}\nstdout:\n${r.stdout}\nstderr:\n${r.stderr}`);
    assert.match(r.stdout, /^demo OK/m);
    // The output is for a person: no JSON log record leaks into it (the link cut used to log one).
    for (const line of `${r.stdout}\n${r.stderr}`.split('\n')) {
      assert.doesNotMatch(line, /^\s*\{/, `a raw log line in the demo's output:\n${line}`);
    }
    assert.match(r.stdout, /replication link: TLS 1\.3, mutually authenticated/);
    assert.match(r.stdout, /created (\S+primary\.img) and its replica \S+replica\.img: 256M, regions of 64K/);
    assert.match(
      r.stdout,
      /primary serves nbd:\/\/127\.0\.0\.1:\d+\/volrep and replicates to 127\.0\.0\.1:\d+/,
    );
    assert.match(r.stdout, /^link CUT$/m);
    // The resync sends the dirty regions only: what it sent equals dirty regions × 64 KiB.
    const dirty = Number(/while cut: (\d+) dirty regions/.exec(r.stdout)?.[1]);
    const sent = Number(/resync done: ([\d.]+) MiB sent for (\d+) dirty regions/.exec(r.stdout)?.[1]);
    assert.ok(dirty > 0, r.stdout);
    assert.equal(sent, Number(((dirty * 65536) / 1024 ** 2).toFixed(1)), r.stdout);
    const hashes = [...r.stdout.matchAll(/^sha256 .*?([0-9a-f]{64})$/gm)].map((m) => m[1]);
    assert.equal(hashes.length, 2, r.stdout);
    assert.equal(new Set(hashes).size, 1, 'primary and replica hashes must be equal');
    assert.notEqual(
      hashes[0],
      'a6d72ac7690f53be6ae46ba88506bd97302a093f7108472bd9efc3cefda06484',
      'the hash of 256 MiB of zeroes would mean nothing was written',
    );
    const dir = /created (\S+)\/primary\.img/.exec(r.stdout)?.[1];
    assert.ok(dir, r.stdout);
    assert.equal(existsSync(dir), false, `the demo must remove ${dir}`);
  });

  it('refuses a --size below 16M: exit 2, one line', async () => {
    assertUsageError(await volrepAsync(['demo', '--size', '1M']), /16M/);
  });
});
