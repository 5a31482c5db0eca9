/**
 * A metadata file that is missing or unreadable never means clean (H18): for every metadata file
 * the daemons read (the primary's log, bitmap and pair-state, the replica's replica-state, and
 * meta.json of both roles), deleting it, overwriting it with random bytes, truncating it or putting
 * a directory in its place makes `volrep primary` / `volrep secondary` refuse to start with exit
 * code 2 and one line naming the file, without repairing, re-creating or locking anything. The
 * library (Volume.open) refuses the same way and releases the volume lock.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import {
  cpSync,
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  truncateSync,
  writeFileSync,
} from 'node:fs';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { VolrepError } from '../../src/errors.js';
import { Volume } from '../../src/volume/replicated.js';
import {
  assertUsageError,
  createVolumeCli,
  nbdRoundTrip,
  type RunResult,
  volrepAsync,
} from '../helpers/clients.js';
import {
  type Daemon,
  identityOf,
  type SecondaryDaemon,
  startPrimary,
  startSecondary,
  tempDir,
} from '../helpers/daemon.js';

/** The metadata files `volrep create` writes for each role (besides meta.json). */
const PRIMARY_FILES = ['log', 'bitmap', 'pair-state'] as const;
const REPLICA_FILES = ['log', 'bitmap', 'replica-state'] as const;

type Role = 'primary' | 'secondary';

/** What each file's refusal says when its content is not volrep's (random bytes) or cut short. */
const UNREADABLE: Record<string, { random: RegExp; truncated: RegExp }> = {
  log: {
    random: /: log file has no valid header/,
    truncated: /: log file has 100 bytes, less than its \d+-byte header/,
  },
  bitmap: {
    random: /: bitmap file has no valid slot/,
    truncated: /: bitmap file has 100 bytes, expected 16384 for 64 regions/,
  },
  'pair-state': {
    random: /pair-state holds no valid record/,
    truncated: /pair-state has 100 bytes, expected 8192/,
  },
  'replica-state': {
    random: /replica-state holds no valid record/,
    truncated: /replica-state has 100 bytes, expected 8192/,
  },
};

function escapeRegExp(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

describe('a metadata file that is missing or unreadable never means clean', { timeout: 120_000 }, () => {
  let tmp: ReturnType<typeof tempDir>;
  /** Pristine volumes (never served): every case works on its own copy. */
  let pristine: string;
  const daemons: Array<Daemon | SecondaryDaemon> = [];
  let cases = 0;

  before(() => {
    tmp = tempDir();
    pristine = path.join(tmp.dir, 'pristine');
    mkdirSync(pristine);
    const primary = createVolumeCli(pristine, 'P', '4M', ['--log-size', '64K']);
    const { volumeId } = JSON.parse(readFileSync(`${primary}.volrep/meta.json`, 'utf8')) as {
      volumeId: string;
    };
    createVolumeCli(pristine, 'R', '4M', ['--log-size', '64K', '--secondary-of', volumeId]);
    // The layout this test is about: if create writes another file, it must be covered here too.
    const listing = (name: string) => readdirSync(path.join(pristine, `${name}.volrep`)).sort();
    // The node identity is not state: a missing one is made anew (peers then refuse it: tls.test.ts).
    const identity = ['identity.crt', 'identity.key'];
    assert.deepEqual(listing('P'), [...PRIMARY_FILES, ...identity, 'meta.json'].sort());
    assert.deepEqual(listing('R'), [...REPLICA_FILES, ...identity, 'meta.json'].sort());
  });
  after(async () => {
    for (const d of daemons) await d.kill();
    tmp?.cleanup();
  });

  /** A fresh copy of the pristine volume of `role`: its volume path and metadata directory. */
  function freshCopy(role: Role): { volume: string; metaDir: string } {
    const name = role === 'primary' ? 'P' : 'R';
    const dir = path.join(tmp.dir, `case-${++cases}`);
    mkdirSync(dir);
    cpSync(path.join(pristine, name), path.join(dir, name));
    cpSync(path.join(pristine, `${name}.volrep`), path.join(dir, `${name}.volrep`), { recursive: true });
    return { volume: path.join(dir, name), metaDir: path.join(dir, `${name}.volrep`) };
  }

  /** Starts the daemon of `role` on the copy; it must refuse, so it never gets to serve. */
  function start(role: Role, volume: string): Promise<RunResult> {
    return role === 'primary'
      ? volrepAsync(['primary', '--volume', volume, '--nbd', '127.0.0.1:0'])
      : volrepAsync(['secondary', '--volume', volume, '--listen', '127.0.0.1:0', '--insecure-plaintext']);
  }

  /** The refusal as the README promises it, and nothing left behind: no lock. */
  function assertRefused(r: RunResult, metaDir: string, pattern: RegExp): void {
    assertUsageError(r, pattern);
    assert.match(r.stderr, /^volrep: /, r.stderr);
    assert.ok(r.stderr.includes(metaDir), `the message must name the metadata directory\n${r.stderr}`);
    assert.equal(existsSync(path.join(metaDir, 'lock')), false, 'a refused start must not leave the lock');
  }

  /** Every file a daemon reads besides meta.json (the secondary reads its log and bitmap too: its own dirty set). */
  const roleFiles: Array<[Role, string]> = [
    ...PRIMARY_FILES.map((f): [Role, string] => ['primary', f]),
    ...REPLICA_FILES.map((f): [Role, string] => ['secondary', f]),
  ];

  for (const [role, file] of roleFiles) {
    it(`${role}: ${file} missing → exit 2, one line naming it as missing; it is not re-created`, async () => {
      const { volume, metaDir } = freshCopy(role);
      const target = path.join(metaDir, file);
      rmSync(target);
      const r = await start(role, volume);
      assertRefused(r, metaDir, new RegExp(`^volrep: ${escapeRegExp(target)} is missing \\(`));
      assert.match(r.stderr, /volrep will not guess its content/);
      assert.match(r.stderr, /volrep create --force/);
      assert.equal(
        existsSync(target),
        false,
        `${file} must not be re-created (an empty one would read as clean)`,
      );
      // Still refused the second time: the first attempt left nothing that passes for the file.
      assertRefused(await start(role, volume), metaDir, / is missing \(/);
    });

    it(`${role}: ${file} overwritten with random bytes → exit 2, one line; the file is left as it was`, async () => {
      const { volume, metaDir } = freshCopy(role);
      const target = path.join(metaDir, file);
      const garbage = randomBytes(statSync(target).size);
      writeFileSync(target, garbage);
      const r = await start(role, volume);
      assertRefused(r, metaDir, UNREADABLE[file].random);
      assert.ok(readFileSync(target).equals(garbage), `${file} must not be reformatted or repaired`);
    });

    it(`${role}: ${file} truncated to 100 bytes → exit 2, one line; the file is left as it was`, async () => {
      const { volume, metaDir } = freshCopy(role);
      const target = path.join(metaDir, file);
      truncateSync(target, 100);
      const r = await start(role, volume);
      assertRefused(r, metaDir, UNREADABLE[file].truncated);
      assert.equal(statSync(target).size, 100, `${file} must not be resized`);
    });

    it(`${role}: a directory in place of ${file} → exit 2, one line`, async () => {
      const { volume, metaDir } = freshCopy(role);
      const target = path.join(metaDir, file);
      rmSync(target);
      mkdirSync(target);
      const r = await start(role, volume);
      assertRefused(r, metaDir, new RegExp(`^volrep: ${escapeRegExp(target)}: EISDIR`));
    });
  }

  for (const role of ['primary', 'secondary'] as const) {
    it(`${role}: meta.json missing → exit 2, one line naming it`, async () => {
      const { volume, metaDir } = freshCopy(role);
      const target = path.join(metaDir, 'meta.json');
      rmSync(target);
      const r = await start(role, volume);
      assertRefused(r, metaDir, new RegExp(`^volrep: ${escapeRegExp(target)} not found`));
      assert.equal(existsSync(target), false);
    });
  }

  it('Volume.open refuses a missing metadata file with VOLREP_ERR_META_MISSING and releases the lock', async () => {
    const { volume, metaDir } = freshCopy('primary');
    for (const file of PRIMARY_FILES) {
      const target = path.join(metaDir, file);
      const saved = readFileSync(target);
      rmSync(target);
      await assert.rejects(Volume.open(volume), (err: unknown) => {
        assert.ok(err instanceof VolrepError, `a VolrepError expected, got ${String(err)}`);
        assert.equal(err.code, 'VOLREP_ERR_META_MISSING', err.message);
        assert.equal(err.exitCode, 2);
        assert.ok(err.message.startsWith(`${target} is missing (`), err.message);
        return true;
      });
      assert.equal(existsSync(target), false, `${file} must not be re-created`);
      assert.equal(existsSync(path.join(metaDir, 'lock')), false, 'the refused open must release the lock');
      writeFileSync(target, saved);
    }

    // Restored: the volume opens in this same process (the failed opens hold no lock), takes a
    // write, and closes; then it opens once more (close released the lock too).
    const v = await Volume.open(volume);
    try {
      await v.transaction().write(0, Buffer.alloc(4096, 7)).commit();
      await v.flush();
      assert.deepEqual([...(await v.read(0, 4))], [7, 7, 7, 7]);
    } finally {
      await v.close();
    }
    const again = await Volume.open(volume);
    await again.close();
    assert.equal(existsSync(path.join(metaDir, 'lock')), false);
  });

  it('Volume.open refuses unreadable metadata files with their own codes and releases the lock', async () => {
    const { volume, metaDir } = freshCopy('primary');
    const codes: Record<string, string> = {
      log: 'VOLREP_ERR_LOG_CORRUPT',
      bitmap: 'VOLREP_ERR_BITMAP_CORRUPT',
      'pair-state': 'VOLREP_ERR_META',
    };
    for (const file of PRIMARY_FILES) {
      const target = path.join(metaDir, file);
      const saved = readFileSync(target);
      writeFileSync(target, randomBytes(saved.length));
      await assert.rejects(Volume.open(volume), (err: unknown) => {
        assert.ok(err instanceof VolrepError, `a VolrepError expected, got ${String(err)}`);
        assert.equal(err.code, codes[file], err.message);
        assert.equal(err.exitCode, 2);
        assert.match(err.message, UNREADABLE[file].random);
        return true;
      });
      assert.equal(existsSync(path.join(metaDir, 'lock')), false, 'the refused open must release the lock');
      writeFileSync(target, saved);
    }
    const v = await Volume.open(volume);
    await v.close();
  });

  it('with every file intact, volrep primary and volrep secondary start (positive control)', async () => {
    const primary = freshCopy('primary');
    const p = await startPrimary(primary.volume);
    daemons.push(p);
    await nbdRoundTrip(p);
    assert.equal(await p.stop(), 0, p.stderr());
    assert.equal(existsSync(path.join(primary.metaDir, 'lock')), false);

    const replica = freshCopy('secondary');
    const s = await startSecondary(replica.volume, { extra: ['--allow-peer', identityOf(primary.volume)] });
    daemons.push(s);
    assert.match(s.listen, /^127\.0\.0\.1:\d+$/);
    assert.equal(await s.stop(), 0, s.stderr());
    assert.equal(existsSync(path.join(replica.metaDir, 'lock')), false);
  });
});
