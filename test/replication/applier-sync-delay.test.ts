/**
 * When the secondary syncs (src/replication/applier.ts): a small batch waits up to SYNC_DELAY_MS
 * for more (one sync per many writes at low queue depth), but never when a barrier, a waiter, or
 * a quarter of the primary's in-flight window asks for it — a primary with a small --window would
 * otherwise wait out the delay on every window.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { ChunkQueue } from '../../src/io/chunk-queue.js';
import { Applier, type ReplicaState, SYNC_DELAY_MS } from '../../src/replication/applier.js';
import { encodeFrame, FrameDecoder } from '../../src/replication/frames.js';
import { decodeMessage, encodeJson } from '../../src/replication/messages.js';
import { SimTime } from '../sim/sim-io.js';
import { instantDevice } from './instant-device.js';

const GEN = { current: '00000000000000a1', base: null, history: [], resync: null };

function setup() {
  let syncs = 0;
  const device = instantDevice((done) => {
    syncs += 1;
    done(null);
  });
  const time = new SimTime();
  const applier = new Applier(
    device,
    { write: async () => {} },
    { lastAppliedUpdate: 0, consistent: true, generations: GEN },
    { clock: time.clockFor('secondary') },
  );
  const acks: ReplicaState[] = [];
  applier.onDurable = (s) => acks.push(s);
  let id = 0;
  const write = (bytes: number) =>
    assert.equal(
      applier.push({
        kind: 'update',
        update: { id: ++id, offset: 0, length: bytes, kind: 'data', resync: false },
        data: [Buffer.alloc(bytes)],
      }),
      undefined,
    );
  return { applier, time, acks, write, syncs: () => syncs };
}

const settle = async () => {
  for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
};

describe('when the secondary syncs', () => {
  it('a small batch waits for the delay, then one sync covers all of it', async () => {
    const { time, acks, write, syncs } = setup();
    for (let i = 0; i < 5; i++) {
      write(4096);
      await settle();
    }
    assert.equal(syncs(), 0, 'nothing asked for a sync yet');
    time.advance(SYNC_DELAY_MS);
    await settle();
    assert.equal(syncs(), 1);
    assert.equal(acks.at(-1)?.lastAppliedUpdate, 5);
  });

  it('a barrier syncs at once', async () => {
    const { applier, acks, write, syncs } = setup();
    write(4096);
    applier.push({ kind: 'barrier' });
    await settle();
    assert.equal(syncs(), 1);
    assert.equal(acks.at(-1)?.lastAppliedUpdate, 1);
  });

  it("a quarter of the primary's window unsynced syncs at once", async () => {
    const { applier, acks, write, syncs } = setup();
    applier.peerWindow(64 * 1024);
    for (let i = 0; i < 3; i++) write(4096);
    await settle();
    assert.equal(syncs(), 0, '12 KiB of a 64 KiB window: it waits');
    write(4096);
    await settle();
    assert.equal(syncs(), 1, '16 KiB: a quarter of the window');
    assert.equal(acks.at(-1)?.lastAppliedUpdate, 4);
  });

  it('a primary that does not say its window gets the default threshold back', async () => {
    const { applier, write, syncs } = setup();
    applier.peerWindow(64 * 1024);
    applier.peerWindow(undefined);
    for (let i = 0; i < 8; i++) write(65536);
    await settle();
    assert.equal(syncs(), 0, '512 KiB is below 1 MiB: it waits for the delay');
  });

  it('a waiter syncs at once', async () => {
    const { applier, write, syncs } = setup();
    write(4096);
    await settle();
    let idle = false;
    void applier.whenIdle().then(() => (idle = true));
    await settle();
    assert.equal(syncs(), 1);
    assert.ok(idle);
  });

  it('a hello says the window; a bad one is refused', () => {
    const hello = (windowBytes: unknown) => {
      const frame = new FrameDecoder().next(
        (() => {
          const q = new ChunkQueue();
          for (const b of encodeFrame('hello', [
            encodeJson({
              volumeId: '00000000-0000-4000-8000-000000000009',
              size: 1 << 20,
              regionSize: 65536,
              role: 'primary',
              generations: GEN,
              windowBytes,
            }),
          ]))
            q.push(b);
          return q;
        })(),
      );
      assert.ok(frame !== undefined && frame.kind === 'frame');
      return decodeMessage(frame.frame);
    };
    const ok = hello(65536);
    assert.ok(ok.type === 'hello' && ok.hello.windowBytes === 65536);
    for (const bad of [0, -1, 1.5, '64K']) assert.equal(hello(bad).type, 'invalid', `windowBytes ${bad}`);
  });
});
