/**
 * `volrep demo` as a process: it creates, serves, writes, reads back and verifies on its own, prints
 * "demo OK" and exits 0, and cleans up its temporary directory.
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { describe, it } from 'node:test';
import { assertUsageError, volrepAsync } from '../helpers/clients.js';

describe('volrep demo', { timeout: 90_000 }, () => {
  it('runs the default demo: "demo OK", matching hashes, exit 0, temp dir removed', async () => {
    const r = await volrepAsync(['demo'], 60_000);
    assert.equal(r.code, 0, `exit ${r.code} signal ${r.signal}\nstdout:\n${r.stdout}\nstderr:\n${r.stderr}`);
    assert.match(r.stdout, /^demo OK/m);
    assert.match(r.stdout, /created (\S+primary\.img): 256M, regions of 64K, id [0-9a-f-]{36}/);
    assert.match(r.stdout, /serving it over NBD at nbd:\/\/127\.0\.0\.1:\d+\/volrep/);
    const hashes = [...r.stdout.matchAll(/^sha256 .*?([0-9a-f]{64})$/gm)].map((m) => m[1]);
    assert.equal(hashes.length, 3, r.stdout);
    assert.equal(new Set(hashes).size, 1, 'expected, read and on-disk hashes must be equal');
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
