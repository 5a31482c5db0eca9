/**
 * `volrep status` against a running primary, and the rules of the replication link's flags
 * (refused before any socket is opened).
 */
import assert from 'node:assert/strict';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { assertUsageError, createVolumeCli, volrepAsync } from '../helpers/clients.js';
import { type Daemon, startPrimary, tempDir } from '../helpers/daemon.js';

describe('volrep status', { timeout: 60_000 }, () => {
  const { dir, cleanup } = tempDir();
  let primary: Daemon;
  let volume: string;

  before(async () => {
    volume = createVolumeCli(dir, 'v.img', '16M');
    primary = await startPrimary(volume, { http: true });
  });
  after(async () => {
    await primary?.stop();
    cleanup();
  });

  it('prints the state for a person', async () => {
    const r = await volrepAsync(['status', '--http', primary.http!]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /^role\s+primary$/m);
    assert.match(r.stdout, /^volume\s+\S+v\.img \(16M, regions of 64K, id [0-9a-f-]{36}\)$/m);
    assert.match(r.stdout, /^dirty\s+0 region\(s\), 0 B$/m);
    assert.match(r.stdout, /^log\s+.* used, 0 active transaction\(s\)$/m);
  });

  it('prints the raw JSON with --json', async () => {
    const r = await volrepAsync(['status', '--http', primary.http!, '--json']);
    assert.equal(r.code, 0, r.stderr);
    const status = JSON.parse(r.stdout) as { role: string; volume: { size: number }; dirtyRegions: number };
    assert.equal(status.role, 'primary');
    assert.equal(status.volume.size, 16 * 1024 * 1024);
    assert.equal(status.dirtyRegions, 0);
  });

  it('says clearly when nothing answers at the address (exit 1, one line)', async () => {
    const r = await volrepAsync(['status', '--http', '127.0.0.1:1']);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /cannot reach http:\/\/127\.0\.0\.1:1\/status/);
    assert.equal(r.stderr.trim().split('\n').length, 1);
  });
});

describe('replication link flags: TLS by default, plaintext only when asked and only on loopback', {
  timeout: 60_000,
}, () => {
  const { dir, cleanup } = tempDir();
  after(() => cleanup());
  const replicaOf = (name: string) =>
    createVolumeCli(dir, name, '16M', ['--secondary-of', '00000000-0000-4000-8000-000000000000']);
  const FP = `sha256:${'AB'.repeat(32)}`;

  it('a secondary needs to be told whom to accept', async () => {
    const volume = replicaOf('s1.img');
    assertUsageError(
      await volrepAsync(['secondary', '--volume', volume, '--listen', '127.0.0.1:0']),
      /needs to know which primary to accept: --allow-peer/,
    );
  });

  it('plaintext is refused on a non-loopback address, on both sides', async () => {
    // 192.0.2.0/24 is reserved for documentation: nothing is ever sent there, the refusal comes first.
    assertUsageError(
      await volrepAsync([
        'secondary',
        '--volume',
        replicaOf('s2.img'),
        '--listen',
        '192.0.2.1:10810',
        '--insecure-plaintext',
      ]),
      /plaintext replication is refused on anything but loopback/,
    );
    const volume = createVolumeCli(dir, 'p1.img', '16M');
    assertUsageError(
      await volrepAsync([
        'primary',
        '--volume',
        volume,
        '--nbd',
        '127.0.0.1:0',
        '--peer',
        '192.0.2.1:10810',
        '--insecure-plaintext',
      ]),
      /plaintext replication is refused on anything but loopback/,
    );
  });

  it("a primary needs the secondary's identity; bad or contradictory flags are refused", async () => {
    const volume = createVolumeCli(dir, 'p2.img', '16M');
    const primary = (...extra: string[]) =>
      volrepAsync(['primary', '--volume', volume, '--nbd', '127.0.0.1:0', ...extra]);
    assertUsageError(
      await primary('--peer', '192.0.2.1:10810'),
      /--peer needs the secondary's identity: --peer-fingerprint/,
    );
    assertUsageError(
      await primary('--peer', '192.0.2.1:10810', '--peer-fingerprint', 'cafe'),
      /is not a SHA-256 certificate fingerprint/,
    );
    assertUsageError(
      await primary('--peer', '127.0.0.1:10810', '--peer-fingerprint', FP, '--insecure-plaintext'),
      /--insecure-plaintext turns TLS off: it cannot go with --peer-fingerprint/,
    );
    assertUsageError(
      await primary('--peer', '127.0.0.1:10810', '--tls-ca', path.join(dir, 'none.pem')),
      /--tls-ca .* not found/,
    );
    assertUsageError(await primary('--peer-fingerprint', FP), /need --peer/);
  });

  it('a primary refuses to write a volume created as a replica, but serves it read-only', async () => {
    const volume = createVolumeCli(dir, 'replica.img', '16M', [
      '--secondary-of',
      '00000000-0000-4000-8000-000000000000',
    ]);
    assertUsageError(
      await volrepAsync(['primary', '--volume', volume, '--nbd', '127.0.0.1:0']),
      /is a replica/,
    );
    const ro = await startPrimary(volume, { extra: ['--read-only'] });
    assert.equal(await ro.stop(), 0);
  });
});
