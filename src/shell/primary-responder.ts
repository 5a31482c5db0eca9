/**
 * A primary's answer on its replication listen address (`volrep primary --listen`): a promoted
 * replica keeps listening where its old primary dials, refuses every hello (nothing is ever
 * written through it) and tells both sides what the generations say. A split brain between an
 * old primary that kept serving and a promoted replica is then seen on both, not left running.
 */
import type { Clock, Timer } from '../io/clock.js';
import type { Connection, ConnectionEvents } from '../io/transport.js';
import type { Generations, HandshakeDecision } from '../replication/generations.js';
import { type ReplicaIdentity, SecondarySession } from '../replication/secondary-session.js';
import type { NodeLogger } from './primary-node.js';

export interface ResponderReport {
  decision: HandshakeDecision;
  peer: Generations;
  reason: string;
}

export class PrimaryResponder {
  private readonly open = new Set<{ connection: Connection; timer?: Timer }>();

  constructor(
    private readonly identity: ReplicaIdentity,
    private readonly generations: () => Generations,
    private readonly clock: Clock,
    private readonly logger: NodeLogger,
    private readonly onReport: (report: ResponderReport) => void,
  ) {}

  accept(connection: Connection): ConnectionEvents {
    const session = new SecondarySession(this.identity, this.clock.now(), this.generations, true);
    const entry: { connection: Connection; timer?: Timer } = { connection };
    this.open.add(entry);
    const run = (fn: () => void) => {
      fn();
      for (let a = session.pollAction(); a !== undefined; a = session.pollAction()) {
        switch (a.type) {
          case 'log':
            this.logger[a.level]({ peer: connection.remote, ...a.fields }, a.msg);
            break;
          case 'handshakeRefused':
            this.onReport({ decision: a.decision, peer: a.peer, reason: a.reason });
            break;
          case 'end':
            connection.write(session.takeOutbox());
            connection.end(a.reason);
            break;
          case 'close':
            connection.write(session.takeOutbox());
            connection.close(a.reason);
            break;
          default: // 'accepted' and the stream's actions never happen: every hello is refused
            break;
        }
      }
      const frames = session.takeOutbox();
      if (frames.length > 0) connection.write(frames);
      entry.timer?.cancel();
      const at = session.nextDeadline();
      if (at !== Number.POSITIVE_INFINITY)
        entry.timer = this.clock.setTimer(at, () => run(() => session.handleTimeout(this.clock.now())));
    };
    run(() => {});
    return {
      open: () => {},
      data: (chunk) => run(() => session.handleData(chunk, this.clock.now())),
      close: () => {
        entry.timer?.cancel();
        this.open.delete(entry);
        session.handleClose();
      },
    };
  }

  close(): void {
    for (const { connection, timer } of this.open) {
      timer?.cancel();
      connection.close('stopping');
    }
    this.open.clear();
  }
}
