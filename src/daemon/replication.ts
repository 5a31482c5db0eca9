/**
 * The primary's replication: joins the engine (through the volume's driver) to the link to the
 * secondary. It turns link events into engine events, engine sends into frames, decides what a
 * new connection needs (a full sync for a brand-new replica, a resync of dirty regions), and
 * marks the resync's start and end in the stream so the secondary knows when it is consistent.
 */
import path from 'node:path';
import type { Logger } from 'pino';
import type { Chunks, UpdateSink } from '../log/driver.js';
import type { Welcome } from '../replication/messages.js';
import { PrimaryLink } from '../replication/primary-link.js';
import type { HostPort } from '../util/address.js';
import type { Volume } from '../volume/replicated.js';
import { SlotFile } from '../volume/slot-file.js';
import { PAIR_STATE_FILE } from '../volume/volume.js';

interface PairState {
  replicaEverSynced: boolean;
}

function validatePairState(v: unknown): PairState | undefined {
  if (typeof v !== 'object' || v === null) return undefined;
  const s = v as Record<string, unknown>;
  return typeof s.replicaEverSynced === 'boolean' ? { replicaEverSynced: s.replicaEverSynced } : undefined;
}

/** How often the resync's end is checked for (besides after every ack). */
const CATCH_UP_CHECK_MS = 100;

export type PeerState = 'connecting' | 'connected' | 'resyncing' | 'disconnected';

export interface ReplicationStatus {
  peer: { address: string; state: PeerState };
  resync: { totalBytes: number; doneBytes: number; bytesPerSecond: number };
  replica: { consistent: boolean; lastAckedUpdate: number };
}

export interface ReplicationOptions {
  peer: HostPort;
  /** Both volumes are known identical (e.g. freshly created, all zero): skip the initial full sync. */
  assumeClean: boolean;
  /** The ack timeout: also how long the secondary may be silent before the link counts as dead. */
  ackTimeoutMs: number;
  logger: Logger;
}

export class PrimaryReplication implements UpdateSink {
  private link!: PrimaryLink;
  private volume!: Volume;
  private engineConnected = false;
  /** Set between a resyncBegin and the barrier that carries the matching resyncEnd. */
  private resyncing = false;
  private resyncEndBarrier = 0;
  private resyncEndAfter = -1;
  private replicaConsistent = false;
  private lastAcked = 0;
  private resyncStartedMs = 0;
  private resyncStartBytes = 0;
  private resyncTotalBytes = 0;
  private timer: NodeJS.Timeout | undefined;
  private connectGeneration = 0;
  private pairState!: SlotFile<PairState>;
  private pairStateWrite: Promise<void> = Promise.resolve();
  /** A replica of this primary has been consistent at least once (persisted in pair-state). */
  private replicaEverSynced = false;

  constructor(private readonly opts: ReplicationOptions) {}

  /**
   * Starts connecting; the volume must have been opened with this object as its sink. Loads the
   * pair's history first: whether a replica of this primary was ever brought to consistency.
   */
  async start(volume: Volume): Promise<void> {
    this.volume = volume;
    const { slots, value } = await SlotFile.open(
      path.join(volume.file.metaDir, PAIR_STATE_FILE),
      validatePairState,
    );
    this.pairState = slots;
    this.replicaEverSynced = value?.replicaEverSynced ?? false;
    this.timer = setInterval(() => this.checkCaughtUp(), CATCH_UP_CHECK_MS);
    this.timer.unref();
    const { meta } = volume;
    this.link = new PrimaryLink({
      peer: this.opts.peer,
      hello: { volumeId: meta.volumeId, size: meta.size, regionSize: meta.regionSize },
      logger: this.opts.logger,
      silenceMsMax: this.opts.ackTimeoutMs,
      events: {
        connected: (welcome) =>
          this.onConnected(welcome).catch((err: Error) => {
            this.opts.logger.error({ err: err.message }, 'could not start replicating on this connection');
            this.link.drop(err.message);
          }),
        acked: (id) => this.onAck(id),
        disconnected: () => this.onDisconnected(),
      },
    });
    this.link.start();
  }

  get reconnects(): number {
    return this.link.reconnects;
  }

  status(): ReplicationStatus {
    const linkState = this.link.state;
    const state: PeerState =
      linkState === 'connected' ? (this.resyncing ? 'resyncing' : 'connected') : linkState;
    const done = Math.min(
      this.resyncTotalBytes,
      this.volume.driver.counters.resyncBytes - this.resyncStartBytes,
    );
    const seconds = (performance.now() - this.resyncStartedMs) / 1000;
    return {
      peer: { address: `${this.opts.peer.host}:${this.opts.peer.port}`, state },
      resync: {
        totalBytes: this.resyncTotalBytes,
        doneBytes: done,
        bytesPerSecond: this.resyncing && seconds > 0 ? Math.round(done / seconds) : 0,
      },
      replica: { consistent: this.replicaConsistent, lastAckedUpdate: this.lastAcked },
    };
  }

  async stop(): Promise<void> {
    clearInterval(this.timer);
    await this.link.stop();
    await this.pairStateWrite;
    await this.pairState.close();
  }

  // UpdateSink: the engine's sends, in stream order.

  send(update: {
    updateId: number;
    offset: number;
    length: number;
    kind: 'data' | 'zero' | 'trim';
    data: Chunks | null;
    resync: boolean;
  }): void {
    const data = (update.data ?? []).map((c) =>
      Buffer.isBuffer(c) ? c : Buffer.from(c.buffer, c.byteOffset, c.byteLength),
    );
    this.link.sendUpdate(
      {
        id: update.updateId,
        offset: update.offset,
        length: update.length,
        kind: update.kind,
        resync: update.resync,
      },
      update.kind === 'data' ? data : [],
    );
  }

  sendBarrier(barrierId: number, afterUpdateId: number): void {
    if (barrierId === this.resyncEndBarrier) {
      this.link.sendResyncEnd(afterUpdateId);
      this.resyncEndAfter = afterUpdateId;
      this.resyncing = false;
      this.opts.logger.info({ afterUpdateId }, 'resync complete: replica marked consistent once durable');
      return;
    }
    this.link.sendBarrier(afterUpdateId);
  }

  disconnect(reason: string): void {
    this.link.drop(reason);
  }

  // Link events.

  private async onConnected(welcome: Welcome): Promise<void> {
    const { driver } = this.volume;
    const log = this.opts.logger;
    this.replicaConsistent = welcome.consistent;
    this.lastAcked = welcome.lastAppliedUpdate;
    const generation = ++this.connectGeneration;
    const virgin = welcome.lastAppliedUpdate === 0 && !welcome.consistent;
    // --assume-clean speaks of the pair's birth only: a replica without history that shows up
    // after this primary has already had a synced replica (e.g. one re-created) gets a full sync.
    const assumeClean = this.opts.assumeClean && !this.replicaEverSynced;
    if (virgin && this.opts.assumeClean && !assumeClean) {
      log.warn(
        'ignoring --assume-clean: this primary has replicated before, and this replica has no history',
      );
    }
    if (virgin && !assumeClean) {
      log.info('replica has never been synchronised: full initial sync');
      // Durable before anything is sent: a crash now must not forget that everything differs.
      await driver.markAllDirty();
      if (this.link.state !== 'connected' || generation !== this.connectGeneration) return;
    }
    const dirty = driver.engine.stats().dirtyRegions;
    if (!welcome.consistent || dirty > 0) {
      this.resyncing = true;
      this.resyncEndBarrier = 0;
      this.resyncStartedMs = performance.now();
      this.resyncStartBytes = driver.counters.resyncBytes;
      this.resyncTotalBytes = dirty * this.volume.meta.regionSize;
      this.link.sendResyncBegin(welcome.lastAppliedUpdate);
    }
    try {
      driver.connected(welcome.lastAppliedUpdate);
      this.engineConnected = true;
    } catch (err) {
      log.error({ err: (err as Error).message }, 'secondary state does not fit this primary');
      this.link.drop((err as Error).message);
      return;
    }
    this.checkCaughtUp();
  }

  private onAck(id: number): void {
    if (!this.engineConnected) return;
    try {
      this.volume.driver.ack(id);
    } catch (err) {
      this.link.drop(`bad ack: ${(err as Error).message}`);
      return;
    }
    this.lastAcked = Math.max(this.lastAcked, id);
    if (this.resyncEndAfter >= 0 && id >= this.resyncEndAfter) {
      this.replicaConsistent = true;
      this.resyncEndAfter = -1;
      if (!this.replicaEverSynced) {
        this.replicaEverSynced = true;
        this.pairStateWrite = this.pairState
          .write({ replicaEverSynced: true })
          .catch((err) => this.opts.logger.error({ err }, 'could not record the pair state'));
      }
    }
    this.checkCaughtUp();
  }

  private onDisconnected(): void {
    this.resyncing = false;
    this.resyncEndBarrier = 0;
    this.resyncEndAfter = -1;
    if (!this.engineConnected) return;
    this.engineConnected = false;
    this.volume.driver.disconnected();
  }

  /** Once the resync has nothing left to send, its end goes into the stream as a barrier. */
  private checkCaughtUp(): void {
    if (!this.resyncing || this.resyncEndBarrier !== 0 || !this.engineConnected) return;
    if (!this.volume.driver.engine.replicaCaughtUp()) return;
    // The barrier may be sent before submitBarrier returns: know its id beforehand.
    this.resyncEndBarrier = this.volume.driver.engine.upcomingBarrierId;
    const id = this.volume.driver.submitBarrier();
    if (id !== this.resyncEndBarrier)
      throw new Error(`resync end barrier ${id} is not the expected ${this.resyncEndBarrier}`);
  }
}
