import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { encodeFrame } from '../../src/replication/frames.js';
import { encodeJson } from '../../src/replication/messages.js';
import {
  PrimarySession,
  RECONNECT_DELAY_MS_MAX,
  RECONNECT_DELAY_MS_MIN,
  REFUSED_RETRY_DELAY_MS_MAX,
} from '../../src/replication/primary-session.js';

const GEN = { current: 'g1', base: null, history: [], resync: null };
const hello = { volumeId: '00000000-0000-4000-8000-00000000000a', size: 1 << 20, regionSize: 65536 };

function session(): PrimarySession {
  return new PrimarySession({ hello, assumeClean: true, replicaEverSynced: true, generations: () => GEN });
}

/** Drives the session through `attempts` failed dials; returns the delay before each redial. */
function delays(s: PrimarySession, attempts: number, fail: (now: number) => void): number[] {
  const out: number[] = [];
  let now = 0;
  for (let i = 0; i < attempts; i++) {
    fail(now);
    const retryAt = s.nextDeadline();
    out.push(retryAt - now);
    now = retryAt;
    s.handleTimeout(now);
    assert.equal(s.state, 'connecting', 'redialed at its deadline');
    while (s.pollAction() !== undefined);
  }
  return out;
}

describe('reconnect backoff', () => {
  it('a secondary that is not there is redialed at least every RECONNECT_DELAY_MS_MAX', () => {
    const s = session();
    s.start(0);
    const d = delays(s, 12, (now) => s.handleClose('connect ECONNREFUSED', now));
    assert.deepEqual(d.slice(0, 3), [
      RECONNECT_DELAY_MS_MIN,
      2 * RECONNECT_DELAY_MS_MIN,
      RECONNECT_DELAY_MS_MAX,
    ]);
    assert.ok(
      d.every((ms) => ms <= RECONNECT_DELAY_MS_MAX),
      `delays ${d.join(', ')} all ≤ ${RECONNECT_DELAY_MS_MAX} ms`,
    );
  });

  it('a refusing secondary is redialed less and less often, up to REFUSED_RETRY_DELAY_MS_MAX', () => {
    const s = session();
    s.start(0);
    const refuse = (now: number) => {
      s.handleOpen(now);
      s.handleData(
        Buffer.concat(encodeFrame('refuse', [encodeJson({ reason: 'split brain', role: 'secondary' })])),
        now,
      );
      s.handleClose('refused', now);
    };
    const d = delays(s, 10, refuse);
    assert.equal(Math.max(...d), REFUSED_RETRY_DELAY_MS_MAX, `delays ${d.join(', ')}`);
    assert.ok(d.at(-1)! > RECONNECT_DELAY_MS_MAX);
    // Once it stops answering (restarted to fix the refusal), the fast cap applies again.
    const after = delays(s, 2, (now) => s.handleClose('connect ECONNREFUSED', now));
    assert.ok(
      after.every((ms) => ms <= RECONNECT_DELAY_MS_MAX),
      `delays ${after.join(', ')}`,
    );
  });

  it('a connection that fails authentication (a TLS certificate refused) is redialed less and less often', () => {
    const s = session();
    s.start(0);
    // Closed during the TLS handshake, refused: never opened for the session.
    const d = delays(s, 10, (now) => s.handleClose('TLS: certificate unknown', now, true));
    assert.equal(Math.max(...d), REFUSED_RETRY_DELAY_MS_MAX, `delays ${d.join(', ')}`);
    const after = delays(s, 2, (now) => s.handleClose('connect ECONNREFUSED', now, false));
    assert.ok(
      after.every((ms) => ms <= RECONNECT_DELAY_MS_MAX),
      `delays ${after.join(', ')}`,
    );
  });
});
