/**
 * A pair born zero (both files made by `volrep create`, src/volume/born-zero.ts): the primary's
 * session skips the full sync only when both sides say so, and only at the first welcome; the
 * marks in the state files are checked, and the file check refuses a file touched since.
 */
import assert from 'node:assert/strict';
import { closeSync, mkdtempSync, openSync, rmSync, truncateSync, utimesSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { describe, it } from 'node:test';
import { ChunkQueue } from '../../src/io/chunk-queue.js';
import { encodeFrame, FrameDecoder } from '../../src/replication/frames.js';
import type { Generations } from '../../src/replication/generations.js';
import { decodeMessage, encodeJson } from '../../src/replication/messages.js';
import { PrimarySession, type PrimarySessionAction } from '../../src/replication/primary-session.js';
import { validatePairState } from '../../src/shell/primary-node.js';
import { validateReplicaState } from '../../src/shell/secondary-node.js';
import { stillBornZero, takeBornZeroMark } from '../../src/volume/born-zero.js';

const GEN: Generations = { current: '00000000000000a1', base: null, history: [], resync: null };
const HELLO = { volumeId: '00000000-0000-4000-8000-000000000009', size: 1 << 20, regionSize: 65536 };
const MARK = { ino: '12', ctimeNs: '1700000000000000000', size: 1 << 20 };

function welcomeFrame(fields: Record<string, unknown>): Buffer {
  return Buffer.concat(
    encodeFrame('welcome', [
      encodeJson({
        ...HELLO,
        role: 'secondary',
        lastAppliedUpdate: 0,
        consistent: false,
        // A replica that never held data takes this side's generation before it welcomes it.
        generations: { ...GEN, resync: { from: null } },
        dirtyRegions: 0,
        ...fields,
      }),
    ]),
  );
}

/** Connects `s` and welcomes it; returns the actions of that welcome. */
function welcome(s: PrimarySession, now: number, fields: Record<string, unknown>): PrimarySessionAction[] {
  s.handleOpen(now);
  s.handleData(welcomeFrame(fields), now);
  const out: PrimarySessionAction[] = [];
  for (let a = s.pollAction(); a !== undefined; a = s.pollAction()) out.push(a);
  return out;
}

const session = (volumeBornZero: boolean) =>
  new PrimarySession({
    hello: HELLO,
    assumeClean: false,
    replicaEverSynced: false,
    volumeBornZero,
    generations: () => GEN,
  });

const fullSync = (actions: PrimarySessionAction[]) => actions.some((a) => a.type === 'markDirty');

describe('a pair born zero', () => {
  it('the first welcome of a replica born zero skips the full sync; any later one does not', () => {
    const s = session(true);
    s.start(0);
    const first = welcome(s, 1, { bornZero: true });
    assert.ok(!fullSync(first), 'both born zero: only the dirty regions are resynced');
    // The mark is given up durably before anything is streamed.
    assert.ok(first.some((a) => a.type === 'peerHoldsGeneration'));
    s.handleClose('cut', 2);
    s.handleTimeout(s.nextDeadline()); // the backoff ends: dial again
    assert.equal(s.state, 'connecting');
    for (let a = s.pollAction(); a !== undefined; a = s.pollAction());
    // Say the replica was re-created on a new file meanwhile: acks of the first connection may
    // have cleaned regions here, so the mark means nothing any more.
    assert.ok(fullSync(welcome(s, 3000, { bornZero: true })), 'a later welcome gets a full sync');
  });

  it('a full sync when only one side was born zero', () => {
    const primaryOnly = session(true);
    primaryOnly.start(0);
    assert.ok(fullSync(welcome(primaryOnly, 1, {})));
    const replicaOnly = session(false);
    replicaOnly.start(0);
    assert.ok(fullSync(welcome(replicaOnly, 1, { bornZero: true })));
  });

  it('the welcome field, and the marks in the state files, are checked', () => {
    const decode = (fields: Record<string, unknown>) => {
      const q = new ChunkQueue();
      q.push(welcomeFrame(fields));
      const frame = new FrameDecoder().next(q);
      assert.ok(frame !== undefined && frame.kind === 'frame');
      return decodeMessage(frame.frame);
    };
    const ok = decode({ bornZero: true });
    assert.ok(ok.type === 'welcome' && ok.welcome.bornZero === true);
    for (const bad of [false, 1, 'yes', {}]) assert.equal(decode({ bornZero: bad }).type, 'invalid');

    const pair = { replicaEverSynced: false, generations: GEN };
    assert.deepEqual(validatePairState({ ...pair, volumeBornZero: MARK })?.volumeBornZero, MARK);
    const replica = { lastAppliedUpdate: 0, consistent: false, generations: { ...GEN, current: null } };
    assert.deepEqual(validateReplicaState({ ...replica, bornZero: MARK }, HELLO.volumeId)?.bornZero, MARK);
    for (const bad of [true, { ...MARK, ino: 12 }, { ...MARK, ctimeNs: '-1' }, { ...MARK, size: 0 }, null]) {
      assert.equal(validatePairState({ ...pair, volumeBornZero: bad }), undefined, JSON.stringify(bad));
      assert.equal(validateReplicaState({ ...replica, bornZero: bad }, HELLO.volumeId), undefined);
    }
  });

  it('a file is born zero only while untouched: no write, no new times, no other size or inode', () => {
    const dir = mkdtempSync(path.join(tmpdir(), 'volrep-born-zero-'));
    try {
      const make = (name: string) => {
        const file = path.join(dir, name);
        closeSync(openSync(file, 'wx'));
        truncateSync(file, 1 << 20);
        return { file, mark: takeBornZeroMark(file) };
      };
      const untouched = make('a');
      assert.ok(stillBornZero(untouched.file, untouched.mark));

      const written = make('b');
      const fd = openSync(written.file, 'r+');
      writeSync(fd, Buffer.from('data'), 0, 4, 4096);
      closeSync(fd);
      assert.ok(!stillBornZero(written.file, written.mark), 'written outside volrep');

      const touched = make('c');
      utimesSync(touched.file, new Date(0), new Date(0));
      assert.ok(!stillBornZero(touched.file, touched.mark), 'times set (its change time moved)');

      const replaced = make('d');
      rmSync(replaced.file);
      make('d');
      assert.ok(!stillBornZero(replaced.file, replaced.mark), 'another file under the same name');
      assert.ok(!stillBornZero(path.join(dir, 'missing'), untouched.mark), 'no file at all');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
