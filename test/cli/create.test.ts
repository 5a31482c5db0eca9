/**
 * `volrep create` as a process: the files it makes, meta.json's keys, adopting and refusing
 * existing files, and the one-line, exit-code-2 answer to every user error.
 */
import assert from 'node:assert/strict';
import { chmodSync, existsSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { assertUsageError } from '../helpers/clients.js';
import { tempDir, volrep } from '../helpers/daemon.js';

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

interface MetaJson {
  formatVersion: number;
  volumeId: string;
  size: number;
  regionSize: number;
  logSize: number;
  role: string;
  createdAt: string;
}

const readMeta = (dir: string): MetaJson => JSON.parse(readFileSync(path.join(dir, 'meta.json'), 'utf8'));

describe('volrep create', { timeout: 60_000 }, () => {
  let tmp: ReturnType<typeof tempDir>;
  before(() => {
    tmp = tempDir();
  });
  after(() => tmp?.cleanup());

  it('creates a sparse volume, meta.json with the documented keys, and the log and bitmap files', () => {
    const volume = path.join(tmp.dir, 'a.img');
    const startedAt = Date.now();
    const r = volrep(['create', '--volume', volume, '--size', '8M']);
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stderr, '');
    assert.match(
      r.stdout,
      /created primary volume .*a\.img \(8388608 bytes, regions of 65536 bytes, id [0-9a-f-]{36}\)/,
    );

    const st = statSync(volume);
    assert.ok(st.isFile());
    assert.equal(st.size, 8 * 1024 * 1024);
    assert.ok(st.blocks * 512 < st.size, `the volume should be sparse (${st.blocks} blocks allocated)`);

    const metaDir = `${volume}.volrep`;
    const meta = readMeta(metaDir);
    for (const key of ['formatVersion', 'volumeId', 'size', 'regionSize', 'createdAt']) {
      assert.ok(key in meta, `meta.json lacks ${key}`);
    }
    assert.equal(meta.formatVersion, 1);
    assert.match(meta.volumeId, UUID);
    assert.ok(r.stdout.includes(meta.volumeId), 'the printed id is the one in meta.json');
    // The node's fingerprint, ready to paste on the secondary; the same one 'volrep identity' prints.
    const printed = /identity (sha256:[0-9A-F]{64}) \(for the secondary: --allow-peer \1\)/.exec(r.stdout);
    assert.ok(printed, r.stdout);
    assert.equal(volrep(['identity', '--volume', volume]).stdout.trim(), printed[1]);
    assert.equal(meta.size, 8 * 1024 * 1024);
    assert.equal(meta.regionSize, 64 * 1024);
    assert.equal(meta.logSize, 64 * 1024 * 1024);
    assert.equal(meta.role, 'primary');
    const created = Date.parse(meta.createdAt);
    assert.ok(Number.isFinite(created), `createdAt ${meta.createdAt} is not a date`);
    assert.equal(new Date(created).toISOString(), meta.createdAt, 'createdAt is ISO 8601');
    assert.ok(created >= startedAt - 2000 && created <= Date.now() + 2000, 'createdAt is now');

    assert.equal(statSync(path.join(metaDir, 'log')).size, 64 * 1024 * 1024);
    assert.ok(statSync(path.join(metaDir, 'bitmap')).isFile());
    assert.ok(statSync(path.join(metaDir, 'bitmap')).size > 0);
    assert.equal(existsSync(path.join(metaDir, 'lock')), false, 'create must not leave a lock');
  });

  it('honours --region-size, --log-size and --meta', () => {
    const volume = path.join(tmp.dir, 'b.img');
    const metaDir = path.join(tmp.dir, 'elsewhere');
    const r = volrep([
      'create',
      '--volume',
      volume,
      '--size',
      '1M',
      '--region-size',
      '4K',
      '--log-size',
      '1M',
      '--meta',
      metaDir,
    ]);
    assert.equal(r.status, 0, r.stderr);
    const meta = readMeta(metaDir);
    assert.equal(meta.size, 1024 * 1024);
    assert.equal(meta.regionSize, 4096);
    assert.equal(meta.logSize, 1024 * 1024);
    assert.equal(statSync(path.join(metaDir, 'log')).size, 1024 * 1024);
    assert.equal(existsSync(`${volume}.volrep`), false, 'no default metadata directory with --meta');
  });

  it('refuses existing metadata without --force (exit 2, one line) and replaces it with --force', () => {
    const volume = path.join(tmp.dir, 'c.img');
    assert.equal(volrep(['create', '--volume', volume, '--size', '1M']).status, 0);
    const first = readMeta(`${volume}.volrep`);

    const again = volrep(['create', '--volume', volume, '--size', '1M']);
    assertUsageError(again, /already holds volrep metadata.*--force/);
    assert.deepEqual(readMeta(`${volume}.volrep`), first, 'meta.json must be unchanged');

    const forced = volrep(['create', '--volume', volume, '--size', '1M', '--force']);
    assert.equal(forced.status, 0, forced.stderr);
    const second = readMeta(`${volume}.volrep`);
    assert.match(second.volumeId, UUID);
    assert.notEqual(second.volumeId, first.volumeId, '--force makes a new volume id');
  });

  it('--force keeps the node identity (the peer pinned it), a new one only when its files are removed', () => {
    const volume = path.join(tmp.dir, 'k.img');
    assert.equal(volrep(['create', '--volume', volume, '--size', '1M']).status, 0);
    const fingerprint = () => volrep(['identity', '--volume', volume]).stdout.trim();
    const first = fingerprint();
    const forced = volrep(['create', '--volume', volume, '--size', '1M', '--force']);
    assert.equal(forced.status, 0, forced.stderr);
    assert.match(forced.stdout, new RegExp(`identity ${first} `));
    assert.equal(fingerprint(), first);
    for (const f of ['identity.key', 'identity.crt']) rmSync(path.join(`${volume}.volrep`, f));
    assert.equal(volrep(['create', '--volume', volume, '--size', '1M', '--force']).status, 0);
    assert.notEqual(fingerprint(), first);
  });

  it('--force with an unusable kept identity (key mode 0644) refuses before it replaces anything', () => {
    const volume = path.join(tmp.dir, 'bad-key.img');
    assert.equal(volrep(['create', '--volume', volume, '--size', '1M']).status, 0);
    const metaDir = `${volume}.volrep`;
    const before = ['meta.json', 'log', 'bitmap', 'pair-state'].map((f) => {
      const st = statSync(path.join(metaDir, f));
      return { f, bytes: readFileSync(path.join(metaDir, f)).toString('base64'), mtimeMs: st.mtimeMs };
    });
    chmodSync(path.join(metaDir, 'identity.key'), 0o644);
    const forced = volrep(['create', '--volume', volume, '--size', '1M', '--force']);
    assertUsageError(forced, /identity\.key is readable by others.*chmod 600/);
    for (const b of before) {
      const st = statSync(path.join(metaDir, b.f));
      assert.equal(st.mtimeMs, b.mtimeMs, `${b.f} must not be rewritten`);
      assert.equal(readFileSync(path.join(metaDir, b.f)).toString('base64'), b.bytes, `${b.f} unchanged`);
    }
  });

  it('refuses without --force when meta.json is gone but other metadata survives (no silent reformat)', () => {
    const volume = path.join(tmp.dir, 'm.img');
    assert.equal(volrep(['create', '--volume', volume, '--size', '1M']).status, 0);
    const log = path.join(`${volume}.volrep`, 'log');
    const before = readFileSync(log);
    rmSync(path.join(`${volume}.volrep`, 'meta.json'));
    const again = volrep(['create', '--volume', volume, '--size', '1M']);
    assertUsageError(
      again,
      /already holds volrep metadata \(log, bitmap, pair-state, identity\.key\).*--force/,
    );
    assert.ok(readFileSync(log).equals(before), 'the surviving log is untouched');
  });

  it('adopts an existing file of exactly the size, keeping its content', () => {
    const volume = path.join(tmp.dir, 'd.img');
    const content = Buffer.alloc(1024 * 1024);
    for (let i = 0; i < content.length; i++) content[i] = (i * 7) & 0xff;
    writeFileSync(volume, content);
    const r = volrep(['create', '--volume', volume, '--size', '1M']);
    assert.equal(r.status, 0, r.stderr);
    assert.ok(readFileSync(volume).equals(content), 'adopting must not change the data');
    assert.equal(readMeta(`${volume}.volrep`).size, 1024 * 1024);
  });

  it('refuses an existing file of another size (exit 2) and leaves no metadata', () => {
    const volume = path.join(tmp.dir, 'e.img');
    writeFileSync(volume, Buffer.alloc(512 * 1024, 1));
    const r = volrep(['create', '--volume', volume, '--size', '1M']);
    assertUsageError(r, /524288.*1048576|1048576.*524288/);
    assert.equal(statSync(volume).size, 512 * 1024, 'the file must be untouched');
    assert.equal(existsSync(`${volume}.volrep`), false, 'no metadata directory may be left');
  });

  it('refuses a volume in a directory that does not exist (exit 2)', () => {
    assertUsageError(volrep(['create', '--volume', path.join(tmp.dir, 'no/such/dir/x.img'), '--size', '1M']));
  });

  for (const [what, args] of [
    ['--size 12Q', ['--size', '12Q']],
    ['--size 1.5G', ['--size', '1.5G']],
    ['--size -1M', ['--size=-1M']],
    ['--size 1000 (not a multiple of 512)', ['--size', '1000']],
    ['--size 0', ['--size', '0']],
    ['--region-size 3K', ['--size', '1M', '--region-size', '3K']],
    ['--region-size 32M', ['--size', '64M', '--region-size', '32M']],
    ['--log-size 1K', ['--size', '1M', '--log-size', '1K']],
  ] as const) {
    it(`bad size flag ${what}: exit 2, one line, nothing created`, () => {
      const volume = path.join(tmp.dir, `bad-${what.replace(/\W+/g, '_')}.img`);
      assertUsageError(volrep(['create', '--volume', volume, ...args]), /size/);
      assert.equal(existsSync(volume), false, 'no volume file may be created');
      assert.equal(existsSync(`${volume}.volrep`), false, 'no metadata may be created');
    });
  }

  it('--secondary-of with something that is not a UUID: exit 2, one line', () => {
    const volume = path.join(tmp.dir, 'sec.img');
    assertUsageError(
      volrep(['create', '--volume', volume, '--size', '1M', '--secondary-of', 'nope']),
      /UUID/,
    );
  });
});

describe('volrep flag errors', { timeout: 60_000 }, () => {
  let tmp: ReturnType<typeof tempDir>;
  before(() => {
    tmp = tempDir();
  });
  after(() => tmp?.cleanup());

  for (const [what, args] of [
    ['an unknown flag', ['create', '--volume', 'x.img', '--size', '1M', '--bogus']],
    ['a missing --volume', ['create', '--size', '1M']],
    ['a missing --size', ['create', '--volume', 'x.img']],
    ['a flag without its value', ['create', '--volume', 'x.img', '--size']],
    ['an unknown command', ['frobnicate']],
    ['an unknown flag to primary', ['primary', '--volume', 'x.img', '--bogus']],
    ['a missing --volume to primary', ['primary']],
  ] as const) {
    it(`${what}: exit 2 with exactly one line on stderr`, () => {
      const r = volrep([...args], { cwd: tmp.dir });
      assertUsageError(r);
      assert.equal(existsSync(path.join(tmp.dir, 'x.img')), false);
    });
  }

  it('--help and --version exit 0', () => {
    const help = volrep(['--help']);
    assert.equal(help.status, 0);
    assert.match(help.stdout, /create/);
    assert.match(help.stdout, /primary/);
    const version = volrep(['--version']);
    assert.equal(version.status, 0);
    assert.match(version.stdout, /^\d+\.\d+\.\d+\n$/);
  });
});
