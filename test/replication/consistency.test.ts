/**
 * Defect 6 of the power-loss issue: the primary reported the replica consistent from an ack that
 * came from a sync batch run before the resync's end mark was durable, and kept reporting it
 * after a disconnect. Now each ack carries the replica's durable state, and the primary's
 * session shows exactly that (and "not consistent" while not connected).
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { systemClock } from '../../src/io/clock.js';
import { Applier, type ReplicaState } from '../../src/replication/applier.js';
import { encodeFrame } from '../../src/replication/frames.js';
import type { Generations } from '../../src/replication/generations.js';
import { encodeAck, encodeJson } from '../../src/replication/messages.js';
import { PrimarySession } from '../../src/replication/primary-session.js';
import { instantDevice } from './instant-device.js';

/** A device that completes everything at once (durability is the store's business here). */
const device = instantDevice((done) => setImmediate(() => done(null)));

/** A state store whose writes finish when the test says so; it records what is durable. */
class SlowStore {
  durable: ReplicaState[] = [];
  private pending: Array<{ state: ReplicaState; done: () => void }> = [];
  write(state: ReplicaState): Promise<void> {
    return new Promise((resolve) =>
      this.pending.push({
        state: { ...state },
        done: () => {
          this.durable.push({ ...state });
          resolve();
        },
      }),
    );
  }
  async finishOne(): Promise<boolean> {
    for (let i = 0; i < 20 && this.pending.length === 0; i++) await new Promise((r) => setImmediate(r));
    const p = this.pending.shift();
    p?.done();
    await new Promise((r) => setImmediate(r));
    return p !== undefined;
  }
}

const GEN: Generations = { current: '00000000000000a1', base: null, history: [], resync: null };

describe('the replica consistency the primary reports', () => {
  it('an ack says consistent only once the resync end mark is durable (the applier)', async () => {
    const store = new SlowStore();
    const applier = new Applier(
      device,
      store,
      { lastAppliedUpdate: 4, consistent: true, generations: GEN },
      {
        clock: systemClock,
        syncDelayMs: 0,
      },
    );
    const acks: ReplicaState[] = [];
    applier.onDurable = (s) => {
      // The consistency mark and generation acked are recorded already; the applied id may trail.
      const recorded = store.durable.at(-1)!;
      assert.deepEqual(
        { consistent: recorded.consistent, generations: recorded.generations },
        { consistent: s.consistent, generations: s.generations },
        'the acked mark is the recorded one',
      );
      assert.ok(recorded.lastAppliedUpdate <= s.lastAppliedUpdate, 'the record never runs ahead');
      acks.push(s);
    };
    applier.push({ kind: 'resyncBegin' });
    assert.ok(await store.finishOne(), 'the begin mark is recorded');
    applier.push({
      kind: 'update',
      update: { id: 5, offset: 0, length: 4096, kind: 'data', resync: true },
      data: [Buffer.alloc(4096, 7)],
    });
    // The batch holding update 5 starts; the end mark arrives while it is being recorded.
    for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
    applier.push({ kind: 'resyncEnd' });
    while (await store.finishOne());
    await applier.whenIdle();
    assert.ok(acks.length >= 2, JSON.stringify(acks));
    const firstConsistent = acks.findIndex((a) => a.consistent);
    assert.ok(firstConsistent >= 0, 'the end of the resync is acked');
    assert.ok(
      acks.slice(0, firstConsistent).every((a) => !a.consistent),
      `nothing before the end mark is acked consistent: ${JSON.stringify(acks)}`,
    );
    assert.deepEqual(acks.at(-1), { lastAppliedUpdate: 5, consistent: true, generations: GEN });
  });

  it("the primary's session mirrors the acks, and forgets on disconnect", () => {
    const hello = { volumeId: '00000000-0000-4000-8000-000000000009', size: 1 << 20, regionSize: 65536 };
    const s = new PrimarySession({
      hello,
      assumeClean: true,
      replicaEverSynced: true,
      generations: () => GEN,
    });
    s.start(0);
    s.handleOpen(1);
    const frame = (type: Parameters<typeof encodeFrame>[0], payload: Buffer[]) =>
      Buffer.concat(encodeFrame(type, payload));
    s.handleData(
      frame('welcome', [
        encodeJson({
          ...hello,
          role: 'secondary',
          lastAppliedUpdate: 4,
          consistent: true,
          generations: GEN,
          dirtyRegions: 0,
        }),
      ]),
      2,
    );
    const actions = () => {
      const out = [];
      for (let a = s.pollAction(); a !== undefined; a = s.pollAction()) out.push(a);
      return out;
    };
    // The replica holds this side's generation: nothing is streamed before the dropped base is durable.
    const welcomed = actions();
    const holds = welcomed.find((a) => a.type === 'peerHoldsGeneration');
    assert.ok(holds !== undefined && holds.type === 'peerHoldsGeneration');
    assert.ok(
      !welcomed.some((a) => a.type === 'engineConnected'),
      'not streaming before the base drop is durable',
    );
    s.handleBaseDropped(holds.connection + 1);
    assert.ok(!actions().some((a) => a.type === 'engineConnected'), 'a stale connection number is ignored');
    s.handleBaseDropped(holds.connection);
    assert.ok(actions().some((a) => a.type === 'engineConnected'));
    assert.equal(s.status().replicaConsistent, true, 'as the welcome says');
    s.sendResyncBegin();
    assert.equal(s.status().replicaConsistent, false, 'a resync begins: not consistent from here');
    s.handleData(frame('ack', [encodeAck({ id: 5, consistent: false })]), 3);
    assert.equal(s.status().replicaConsistent, false, 'an ack of resync data while the mark is not durable');
    s.sendBarrier('resyncEnd', 5);
    s.handleData(frame('ack', [encodeAck({ id: 5, consistent: false })]), 4);
    assert.equal(s.status().replicaConsistent, false, 'the end mark is sent, not yet durable');
    s.handleData(frame('ack', [encodeAck({ id: 5, consistent: true })]), 5);
    assert.equal(s.status().replicaConsistent, true, 'durable now');
    s.handleClose('cut', 6);
    assert.equal(s.status().replicaConsistent, false, 'unknown once the link is down');
    assert.ok(actions().some((a) => a.type === 'engineDisconnected'));
  });
});
