/**
 * How the secondary writes the replica (src/replication/applier.ts): adjacent data updates queued
 * behind a running write go out as one write; up to WRITES_IN_FLIGHT_MAX writes run side by side,
 * never two that overlap; the applied id (what a sync may cover) is the oldest write not done;
 * a barrier waits for every write before it. The simulator checks the same rules against power
 * loss; these pin each one down with a device whose writes complete when the test says.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import type { BlockDevice, Done } from '../../src/io/block-device.js';
import {
  Applier,
  COALESCE_BYTES_MAX,
  type ReplicaState,
  WRITES_IN_FLIGHT_MAX,
} from '../../src/replication/applier.js';
import { SimTime } from '../sim/sim-io.js';

const GEN = { current: '00000000000000a1', base: null, history: [], resync: null };
const KiB = 1024;

interface PendingWrite {
  offset: number;
  length: number;
  bytes: Buffer;
  done: Done;
}

/** A 64 MiB device whose writes wait until the test completes them; its syncs complete at once. */
function heldDevice() {
  const held: PendingWrite[] = [];
  let syncs = 0;
  const device: BlockDevice = {
    size: 64 << 20,
    readOnly: false,
    read: (_o, _l, _b, _a, done: Done) => done(null),
    write: (offset, data, length, _fua, done) =>
      held.push({ offset, length, bytes: Buffer.concat(data, length), done }),
    writeZeroes: (offset, length, _fua, done) =>
      held.push({ offset, length, bytes: Buffer.alloc(length), done }),
    trim: (offset, length, _fua, done) => held.push({ offset, length, bytes: Buffer.alloc(length), done }),
    flush: (done) => {
      syncs += 1;
      done(null);
    },
  };
  return { device, held, syncs: () => syncs };
}

function setup() {
  const { device, held, syncs } = heldDevice();
  const time = new SimTime();
  const applier = new Applier(
    device,
    { write: async () => {} },
    { lastAppliedUpdate: 0, consistent: true, generations: GEN },
    { clock: time.clockFor('secondary'), syncDelayMs: 0 },
  );
  const acks: ReplicaState[] = [];
  applier.onDurable = (s) => acks.push(s);
  let id = 0;
  const push = (offset: number, length: number, fill = id + 1) =>
    assert.equal(
      applier.push({
        kind: 'update',
        update: { id: ++id, offset, length, kind: 'data', resync: false },
        data: [Buffer.alloc(length, fill)],
      }),
      undefined,
    );
  const complete = (i: number) => held.splice(i, 1)[0].done(null);
  return { applier, held, acks, push, complete, syncs, time };
}

const settle = async () => {
  for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
};

describe('how the secondary writes the replica', () => {
  it('joins the adjacent updates queued while every write slot is busy into one write, up to the limit', () => {
    const { applier, held, push, complete } = setup();
    const region = 64 * KiB;
    // Each starts at once while a slot is free.
    for (let r = 0; r < WRITES_IN_FLIGHT_MAX; r++) push(r * region, region);
    assert.equal(held.length, WRITES_IN_FLIGHT_MAX);
    // These queue up behind them.
    const perWrite = COALESCE_BYTES_MAX / region;
    const queued = perWrite + 2;
    for (let r = 0; r < queued; r++) push((WRITES_IN_FLIGHT_MAX + r) * region, region, 100 + r);
    assert.equal(held.length, WRITES_IN_FLIGHT_MAX);
    complete(0);
    const joined = held.at(-1)!;
    assert.deepEqual([joined.offset, joined.length], [WRITES_IN_FLIGHT_MAX * region, COALESCE_BYTES_MAX]);
    // Each update's bytes at its own place.
    for (let r = 0; r < perWrite; r++) assert.equal(joined.bytes[r * region], 100 + r);
    complete(0);
    const rest = held.at(-1)!;
    assert.deepEqual([rest.offset, rest.length], [(WRITES_IN_FLIGHT_MAX + perWrite) * region, 2 * region]);
    while (held.length > 0) complete(0);
    assert.equal(applier.writtenId, WRITES_IN_FLIGHT_MAX + queued);
  });

  it('does not join updates that are not adjacent, nor zeroes with data', () => {
    const { applier, held, push, complete } = setup();
    for (let r = 0; r < WRITES_IN_FLIGHT_MAX; r++) push((8 + r) << 20, 64 * KiB); // busy slots
    push(0, 64 * KiB);
    push(128 * KiB, 64 * KiB); // a gap
    const zeroId = WRITES_IN_FLIGHT_MAX + 3;
    assert.equal(
      applier.push({
        kind: 'update',
        update: { id: zeroId, offset: 192 * KiB, length: 64 * KiB, kind: 'zero', resync: false },
        data: [],
      }),
      undefined,
    );
    for (let r = 0; r < WRITES_IN_FLIGHT_MAX; r++) complete(0);
    assert.deepEqual(
      held.map((w) => [w.offset, w.length]),
      [
        [0, 64 * KiB],
        [128 * KiB, 64 * KiB],
        [192 * KiB, 64 * KiB],
      ],
    );
    while (held.length > 0) complete(0);
    assert.equal(applier.writtenId, zeroId);
  });

  it('never runs two writes that overlap: the later waits for the earlier', () => {
    const { applier, held, push, complete } = setup();
    push(0, 64 * KiB, 1);
    push(32 * KiB, 64 * KiB, 2); // overlaps the first
    push(1 << 20, 64 * KiB, 3); // behind it in the queue: waits too, the stream is in order
    assert.equal(held.length, 1);
    complete(0);
    assert.deepEqual(
      held.map((w) => [w.offset, w.bytes[0]]),
      [
        [32 * KiB, 2],
        [1 << 20, 3],
      ],
    );
    while (held.length > 0) complete(0);
    assert.equal(applier.writtenId, 3);
  });

  it('does not join an update into a write when it overlaps an older write still running', () => {
    // Found in review: the queue's head overlapped nothing, the update joined behind it did.
    const { applier, held, push, complete } = setup();
    const replica = Buffer.alloc(1 << 20);
    const land = (i: number) => {
      const w = held[i];
      w.bytes.copy(replica, w.offset);
      complete(i);
    };
    push(512 * KiB, 64 * KiB, 1);
    push(64 * KiB, 64 * KiB, 2);
    push(768 * KiB, 64 * KiB, 3); // every slot busy
    push(0, 64 * KiB, 4); // adjacent to the next, overlaps nothing
    push(64 * KiB, 64 * KiB, 5); // overlaps update 2, still running
    land(0); // update 1 done: update 4 starts, alone
    assert.deepEqual(
      held.map((w) => [w.offset, w.length]),
      [
        [64 * KiB, 64 * KiB],
        [768 * KiB, 64 * KiB],
        [0, 64 * KiB],
      ],
    );
    land(2);
    while (held.length > 0) land(0);
    assert.equal(applier.writtenId, 5);
    assert.equal(replica[64 * KiB], 5, 'the newest update holds its range');
  });

  it('counts an update applied only once every write before it is done', async () => {
    const { applier, held, acks, push, complete } = setup();
    push(0, 64 * KiB);
    push(1 << 20, 64 * KiB);
    push(2 << 20, 64 * KiB);
    assert.equal(held.length, 3);
    complete(2); // the newest first
    complete(1);
    await settle();
    assert.equal(applier.writtenId, 0, 'update 1 is still being written');
    assert.equal(acks.length, 0, 'nothing acked while update 1 is not written');
    complete(0);
    await settle();
    assert.equal(applier.writtenId, 3);
    assert.equal(acks.at(-1)?.lastAppliedUpdate, 3);
  });

  it('a barrier waits for every write before it, and nothing after it starts until it is durable', async () => {
    const { applier, held, push, complete, syncs } = setup();
    push(0, 64 * KiB);
    push(1 << 20, 64 * KiB);
    assert.equal(applier.push({ kind: 'barrier' }), undefined);
    push(2 << 20, 64 * KiB);
    assert.equal(held.length, 2, 'the write after the barrier waits');
    complete(1);
    await settle();
    assert.equal(held.length, 1);
    const before = syncs();
    complete(0);
    await settle();
    assert.ok(syncs() > before, 'the barrier synced');
    assert.deepEqual(
      held.map((w) => w.offset),
      [2 << 20],
    );
    complete(0);
    await applier.whenIdle();
    assert.equal(applier.state.lastAppliedUpdate, 3);
  });
});
