/**
 * A fresh pair — both volume files made by `volrep create` — syncs only what was written since:
 * a 1 TiB sparse pair is in sync without sending (or reading, or zeroing) a terabyte. And the
 * file checks that guard it: a replica file written outside volrep after `volrep create` gets a
 * full sync (the primary's side of that is e2e.test.ts's first test).
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { closeSync, openSync, statSync, writeSync } from 'node:fs';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { NodeBlockFile } from '../../src/io/block-file.js';
import { SlotFile } from '../../src/io/slot-file.js';
import { validatePairState } from '../../src/shell/primary-node.js';
import { validateReplicaState } from '../../src/shell/secondary-node.js';
import { PAIR_STATE_FILE, REPLICA_STATE_FILE } from '../../src/volume/volume.js';
import { describeRun, qemuIo, readRange } from '../helpers/clients.js';
import { needTool } from '../helpers/daemon.js';
import { Pair, REGION } from './pair.js';

const MiB = 1024 * 1024;
const skip = needTool('qemu-io', 'qemu-utils');

describe('a pair born zero', { skip, timeout: 180_000 }, () => {
  const pairs: Pair[] = [];
  after(async () => {
    for (const p of pairs) await p.cleanup();
  });

  it('1 TiB fresh and sparse: the first sync sends only the regions written before it', async () => {
    const pair = new Pair({ size: '1T', proxy: true });
    pairs.push(pair);
    await pair.startSecondary();
    await pair.peerAddress();
    pair.proxy!.setMode({ kind: 'refuse' }); // the secondary is out of reach at first
    await pair.startPrimary();
    const writes = [
      [0, MiB],
      [3 * MiB + 4096, 70_000],
      [512 * 1024 * MiB, MiB],
      [1024 * 1024 * MiB - MiB, MiB],
    ];
    const q = await qemuIo(
      pair.primary!.nbd.uri,
      writes.map(([at, n], i) => `write -P ${0x11 + i} ${at} ${n}`),
    );
    assert.equal(q.code, 0, describeRun('qemu-io', q));
    const started = performance.now();
    pair.proxy!.setMode({ kind: 'pass' });
    await pair.waitInSync('the first sync', 60_000);
    const seconds = (performance.now() - started) / 1000;
    // Whole regions: the 70,000 bytes at 3 MiB + 4 KiB touch two of them.
    let regions = 0;
    for (const [at, n] of writes) regions += Math.floor((at + n - 1) / REGION) - Math.floor(at / REGION) + 1;
    const resynced = await pair.primaryMetric('volrep_resync_bytes_total');
    console.log(
      `1 TiB born-zero pair: in sync ${seconds.toFixed(2)} s after the link came up, ${resynced} bytes resynced`,
    );
    assert.equal(resynced, regions * REGION, `only the ${regions} regions written are sent`);
    assert.ok(pair.primary!.stderr().includes('both volumes were created empty'), pair.primary!.stderr());
    for (const [at, n] of writes)
      assert.deepEqual(
        readRange(pair.secondaryVolume, at, n),
        readRange(pair.primaryVolume, at, n),
        `replica bytes at ${at}`,
      );
    const allocated = statSync(pair.secondaryVolume).blocks * 512;
    assert.ok(allocated <= 8 * MiB, `the replica stays sparse (${allocated} bytes allocated)`);
    const sec = await pair.secondaryStatus();
    assert.equal(sec.consistent, true, JSON.stringify(sec));
    // Both marks are given up durably: a replica re-created later gets a full sync.
    const read = async <T>(file: string, validate: (v: unknown) => T | undefined): Promise<T> => {
      const f = await NodeBlockFile.open(file);
      try {
        return (await SlotFile.open(f, path.basename(file), validate)).value;
      } finally {
        await f.close();
      }
    };
    const pairState = await read(`${pair.primaryVolume}.volrep/${PAIR_STATE_FILE}`, (v) =>
      validatePairState(v),
    );
    assert.equal(pairState.volumeBornZero, undefined, JSON.stringify(pairState));
    const replicaState = await read(`${pair.secondaryVolume}.volrep/${REPLICA_STATE_FILE}`, (v) =>
      validateReplicaState(v, pair.volumeId),
    );
    assert.equal(replicaState.bornZero, undefined, JSON.stringify(replicaState));
  });

  /** A replica written outside volrep (`when`: before or after its daemon starts) gets a full sync. */
  async function writtenOutside(when: 'before its start' | 'while it waits'): Promise<void> {
    const pair = new Pair({ size: '64M' });
    pairs.push(pair);
    if (when === 'while it waits') await pair.startSecondary();
    const fd = openSync(pair.secondaryVolume, 'r+');
    try {
      writeSync(fd, randomBytes(MiB), 0, MiB, 7 * MiB);
    } finally {
      closeSync(fd);
    }
    if (when === 'before its start') await pair.startSecondary();
    await pair.startPrimary();
    await pair.waitInSync('the first sync', 60_000);
    assert.equal(await pair.primaryMetric('volrep_resync_bytes_total'), 64 * MiB, 'a full sync');
    assert.ok(!pair.primary!.stderr().includes('both volumes were created empty'));
    await pair.assertIdentical('after the full sync');
  }

  it('a replica file written outside volrep after `volrep create` gets a full sync', () =>
    writtenOutside('before its start'));

  it('a replica file written outside volrep while its daemon waits for the primary gets a full sync', () =>
    // The secondary checks its file at the first welcome, not only at its start.
    writtenOutside('while it waits'));
});
