/**
 * `volrep promote` and `volrep demote` as a person meets them: what they refuse and why, what
 * they print, and an old primary started as a secondary without demote.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { NodeBlockFile } from '../../src/io/block-file.js';
import { SlotFile } from '../../src/io/slot-file.js';
import { assertUsageError, createVolumeCli, volrepAsync } from '../helpers/clients.js';
import { startSecondary, tempDir, volrep } from '../helpers/daemon.js';

const role = (volume: string) => JSON.parse(readFileSync(`${volume}.volrep/meta.json`, 'utf8')).role;
const GEN = '00000000000000c1';

async function setReplicaState(volume: string, value: object): Promise<void> {
  const f = await NodeBlockFile.open(`${volume}.volrep/replica-state`);
  try {
    await SlotFile.format(f, value);
  } finally {
    await f.close();
  }
}

describe('volrep promote / demote', () => {
  const { dir, cleanup } = tempDir('volrep-roles-');
  after(cleanup);
  const primary = createVolumeCli(dir, 'p.img', '4M');
  const id = JSON.parse(readFileSync(`${primary}.volrep/meta.json`, 'utf8')).volumeId as string;

  it('refuses what makes no sense: promote a primary, demote a secondary, a volume without metadata', () => {
    const replica = createVolumeCli(dir, 'r1.img', '4M', ['--secondary-of', id]);
    assertUsageError(volrep(['promote', '--volume', primary]), /already a primary/);
    assertUsageError(volrep(['demote', '--volume', replica]), /already a secondary/);
    assertUsageError(volrep(['promote', '--volume', path.join(dir, 'none.img')]), /not found/);
    assert.equal(role(primary), 'primary');
    assert.equal(role(replica), 'secondary');
  });

  it('a replica that was never in sync, or is mid-resync, is promoted only with --force, which says what it means', async () => {
    const replica = createVolumeCli(dir, 'r2.img', '4M', ['--secondary-of', id]);
    assertUsageError(volrep(['promote', '--volume', replica]), /never in sync with a primary.*--force/);
    await setReplicaState(replica, {
      lastAppliedUpdate: 7,
      consistent: false,
      generations: { current: GEN, base: null, history: [] },
    });
    const r = volrep(['promote', '--volume', replica]);
    assertUsageError(r, /marked inconsistent: a resync into it was cut short/);
    assert.match(r.stderr, /no state the primary ever had/);
    assert.equal(role(replica), 'secondary', 'a refused promote changes nothing');
    const forced = volrep(['promote', '--force', '--volume', replica]);
    assert.equal(forced.status, 0, forced.stderr);
    assert.match(forced.stdout, /is a primary now \(generation 00000000;/);
    assert.equal(role(replica), 'primary');
  });

  it('promote keeps the generation; demote gives up only what was begun apart', async () => {
    const replica = createVolumeCli(dir, 'r3.img', '4M', ['--secondary-of', id]);
    await setReplicaState(replica, {
      lastAppliedUpdate: 7,
      consistent: true,
      generations: { current: GEN, base: null, history: [] },
    });
    const p = volrep(['promote', '--volume', replica]);
    assert.equal(p.status, 0, p.stderr);
    assert.match(p.stdout, /generation 00000000; a new one starts with its first write/);
    const d = volrep(['demote', '--volume', replica]);
    assert.equal(d.status, 0, d.stderr);
    assert.doesNotMatch(d.stdout, /given up/, 'nothing was written apart');
    assert.equal(role(replica), 'secondary');
  });

  it('an old primary started as a secondary without demote becomes one, keeps its writes, and says so', async () => {
    const old = createVolumeCli(dir, 'old.img', '4M');
    const s = await startSecondary(old, { extra: ['--insecure-plaintext'] });
    assert.equal(await s.stop(), 0);
    assert.match(s.stderr(), /was a primary and was not demoted/);
    assert.equal(role(old), 'secondary');
    assertUsageError(
      await volrepAsync(['primary', '--volume', old, '--nbd', '127.0.0.1:0']),
      /is a replica: make it the primary with 'volrep promote/,
    );
  });
});
