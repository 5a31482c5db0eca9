/**
 * The invariants the simulator checks after every step (DESIGN.md §3), against the world's own
 * bookkeeping (the disks, the network, the client's tags), never against what the code under
 * test says about itself:
 *
 * - I1: a power loss of the primary now, then recovery (the real code, on copies of its files
 *   crashed by the PRNG), marks every region whose bytes may differ between volume and replica.
 * - I3/I4: a region the running engine holds clean is equal on both sides, durably on the
 *   replica, with nothing on its way to it.
 * - H14 and acked-never-lost: the replica's durable state never claims an update that is not
 *   durable there, and the primary never heard of one as durable that the replica could lose.
 * - I5: after a power loss of the secondary now, a replica marked consistent that holds a write
 *   issued after a barrier (FLUSH or FUA) holds every write completed before that barrier.
 * - Sync mode: every write whose completion the client saw (within one connection) is in the
 *   replica's durable image — what a failover after a primary power loss would find.
 * - FLUSH and FUA on the primary: what they promised is in the volume's durable image.
 */
import { IndicatorMap } from '../../src/core/indicator-map.js';
import type { BlockFile } from '../../src/io/block-file.js';
import { SlotFile } from '../../src/io/slot-file.js';
import { recover } from '../../src/log/recovery.js';
import type { ReplicaState } from '../../src/replication/applier.js';
import { Prng } from './prng.js';
import type { SimDisk } from './sim-disk.js';
import { SECTOR_BYTES, Workload } from './workload.js';
import { SimFailure, type World } from './world.js';

export class Checks {
  private i1Key = '';
  private i1Dirty: IndicatorMap | undefined;
  private i5Key = '';
  private h14Key = -1;
  private durableApplied = 0;
  private primaryKey = '';
  private syncKey = '';

  constructor(private readonly w: World) {}

  async all(): Promise<void> {
    this.primaryDurable();
    this.syncMode('now');
    await this.h14();
    await this.i1();
    this.memory();
    await this.i5();
  }

  /** I1, with real recovery on copies of the primary's metadata after a simulated power loss. */
  private async i1(): Promise<void> {
    const w = this.w;
    const key = `${w.logDisk.version}:${w.bitmapDisk.version}`;
    if (key !== this.i1Key) {
      this.i1Key = key;
      const fork = new Prng(w.prng.next());
      const log = w.logDisk.clone();
      const bitmap = w.bitmapDisk.clone();
      log.crash(fork);
      bitmap.crash(fork);
      try {
        const r = await recover(log, bitmap, w.regionCount);
        this.i1Dirty = IndicatorMap.fromBytes(w.regionCount, r.state.dirty);
        const sent = w.sentUpdates.at(-1)?.id ?? 0;
        if (r.state.idLimit <= Math.max(sent, w.maxAckSeen)) {
          this.fail(
            `H14: after a power loss now the primary would reuse update ids (limit ${r.state.idLimit}, ${sent} was sent)`,
          );
        }
      } catch (err) {
        if (err instanceof SimFailure) throw err;
        this.fail(`after a power loss now the primary could not recover: ${(err as Error).message}`);
      }
    }
    const dirty = this.i1Dirty!;
    const unstable = this.unstableRegions();
    for (let r = 0; r < w.regionCount; r++) {
      if (dirty.test(r)) continue;
      const why = unstable.get(r) ?? this.differs(r, w.replica, 'current');
      if (why !== undefined) {
        this.fail(
          `I1: region ${r} is clean in what a power loss now would leave the primary, but ${why} (recovered dirty: [${[...dirty.iterate()]}])`,
        );
      }
    }
  }

  /** I3/I4: what the running engine holds clean is the same on both sides, durably. */
  private memory(): void {
    const w = this.w;
    const node = w.primary.node;
    if (w.primary.state !== 'up' || node === undefined) return;
    const indicator = node.engine.indicator;
    const unstable = this.unstableRegions();
    for (let r = 0; r < w.regionCount; r++) {
      if (indicator.test(r)) continue;
      const why = unstable.get(r) ?? this.differs(r, w.replica, 'durable');
      // A volume write that finished but is not synced is fine here (H15 keeps it in the window).
      if (why !== undefined && !why.startsWith('the volume has unsynced')) {
        this.fail(`I3/I4: region ${r} is clean in the running engine, but ${why}`);
      }
    }
  }

  /**
   * H14 (the replica's durable state is never ahead of its durable data) and acked-never-lost
   * (the primary never took as durable what the replica could lose).
   */
  private async h14(): Promise<void> {
    const w = this.w;
    if (w.stateDisk.durableVersion !== this.h14Key) {
      this.h14Key = w.stateDisk.durableVersion;
      this.durableApplied = (await this.readReplicaState(durableFile(w.stateDisk), 'now')).lastAppliedUpdate;
    }
    // Writes durable from the first on are done with: only the first one not durable matters.
    while (w.writtenIds.length > 0 && w.durableIds.has(w.writtenIds[0]))
      w.durableIds.delete(w.writtenIds.shift()!);
    const firstMissing = w.writtenIds[0];
    if (firstMissing !== undefined && firstMissing <= this.durableApplied) {
      this.fail(
        `H14: the replica's durable state says update ${this.durableApplied} is applied, but update ${firstMissing} is not durable`,
      );
    }
    // The replica's record may lag its data (one sync per batch): what is acked must be durable
    // data, checked as each ack leaves the secondary; the record can only trail.
    if (w.ackNotDurable !== undefined) this.fail(`acked but not durable: ${w.ackNotDurable}`);
    if (firstMissing !== undefined && firstMissing <= w.maxAckSeen) {
      this.fail(
        `acked but not durable: the primary heard update ${w.maxAckSeen} is durable, update ${firstMissing} is not durable on the replica`,
      );
    }
  }

  /** I5 on a copy of the secondary's disks crashed now. */
  private async i5(): Promise<void> {
    const w = this.w;
    const key = `${w.replica.version}:${w.stateDisk.version}:${w.workload.barriers.length}`;
    if (key === this.i5Key) return;
    this.i5Key = key;
    const fork = new Prng(w.prng.next());
    const replica = w.replica.clone();
    const state = w.stateDisk.clone();
    replica.crash(fork);
    state.crash(fork);
    const s = await this.readReplicaState(state, 'after a power loss now');
    if (!s.consistent) return;
    this.barrierRule(
      Workload.decodeImage((o, l) => replica.view(o, l), w.workload.sectors),
      'the replica after a power loss now',
    );
  }

  /** If the image holds a write issued after a barrier completed, it holds what the barrier covers. */
  private barrierRule(held: Int32Array, where: string): void {
    const wl = this.w.workload;
    let latest = -1;
    let latestSeq = 0;
    for (const seq of held) {
      if (seq <= 0) continue;
      const issued = wl.writes.get(seq)!.issueStep;
      if (issued > latest) {
        latest = issued;
        latestSeq = seq;
      }
    }
    const barriers = wl.barriers;
    let lo = 0;
    let hi = barriers.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (barriers[mid].completeStep < latest) lo = mid + 1;
      else hi = mid;
    }
    if (lo === 0) return;
    const b = barriers[lo - 1];
    for (let s = 0; s < wl.sectors; s++) {
      const before = wl.latestCompletedBefore(s, b.issueStep);
      let req = before && { seq: before.seq, zero: before.kind !== 'data' };
      for (const fw of b.writes ?? []) {
        const first = fw.offset / SECTOR_BYTES;
        if (s >= first && s < first + fw.length / SECTOR_BYTES && (req === undefined || fw.seq > req.seq)) {
          req = { seq: fw.seq, zero: fw.kind !== 'data' };
        }
      }
      const why = wl.violates(s, held[s], req);
      if (why !== undefined) {
        this.fail(
          `I5 (${where}): it holds write #${latestSeq}, issued at step ${latest} after the ${b.kind} of step ${b.issueStep} completed (step ${b.completeStep}), but ${why}`,
        );
      }
    }
  }

  /**
   * Sync mode (README): what the client saw complete is written on the replica, and what a FUA
   * write or a FLUSH covered is in the replica's durable image.
   */
  syncMode(where: string): void {
    const w = this.w;
    if (!w.syncMode) return;
    const key = `${w.replica.version}:${w.replica.durableVersion}:${w.workload.requirementsVersion}`;
    if (key === this.syncKey) return;
    this.syncKey = key;
    const wl = w.workload;
    for (let s = 0; s < wl.sectors; s++) {
      const durable = wl.replicaDurable[s];
      const notDurable = durable && wl.violates(s, decodeAt(w.replica, s, true), durable);
      if (notDurable)
        this.fail(
          `sync mode (${where}): a FUA write or a FLUSH the client saw complete is not durable on the replica: ${notDurable}`,
        );
      const written = wl.replicaWritten[s];
      const notWritten = written && wl.violates(s, decodeAt(w.replica, s, false), written);
      if (notWritten)
        this.fail(
          `sync mode (${where}): a write the client saw complete is not on the replica: ${notWritten}`,
        );
    }
  }

  /** FLUSH and FUA: what they made durable on the primary's volume is in its durable image. */
  private primaryDurable(): void {
    const w = this.w;
    const key = `${w.volume.durableVersion}:${w.workload.requirementsVersion}`;
    if (key === this.primaryKey) return;
    this.primaryKey = key;
    const wl = w.workload;
    for (let s = 0; s < wl.sectors; s++) {
      const why = wl.violates(s, decodeAt(w.volume, s, true), wl.primaryDurable[s]);
      if (why !== undefined)
        this.fail(
          `FLUSH/FUA on the primary: a completed barrier's write is not durable on the volume: ${why}`,
        );
    }
  }

  // ---------------------------------------------------------------------------------------------

  /** Regions where a power loss or what is in flight could still change bytes, and why. */
  private unstableRegions(): Map<number, string> {
    const w = this.w;
    const out = new Map<number, string>();
    const mark = (offset: number, length: number, why: string) => {
      for (let r = regionOf(w, offset); r <= regionOf(w, offset + length - 1); r++)
        if (!out.has(r)) out.set(r, why);
    };
    for (const op of w.io.pending) {
      if (op.kind !== 'write') continue;
      if (op.disk === w.volume) mark(op.offset, op.length, 'a volume write to it is in flight');
      if (op.disk === w.replica) mark(op.offset, op.length, 'a replica write to it is in flight');
    }
    for (const u of w.updatesInFlight())
      mark(u.offset, u.length, `update ${u.id} to it is on its way to the replica`);
    for (const [o, l] of w.replica.unsyncedRanges()) mark(o, l, 'the replica has unsynced writes to it');
    for (const [o, l] of w.volume.unsyncedRanges()) mark(o, l, 'the volume has unsynced writes to it');
    return out;
  }

  /** Why region `r` differs between the volume (page cache) and the replica's image, or undefined. */
  private differs(r: number, replica: SimDisk, image: 'current' | 'durable'): string | undefined {
    const w = this.w;
    const start = r * w.config.regionSize;
    const length = Math.min(w.config.regionSize, w.config.volumeSize - start);
    const v = w.volume.view(start, length);
    const rep = image === 'current' ? replica.view(start, length) : replica.durableView(start, length);
    if (Buffer.compare(v, rep) === 0) return undefined;
    for (let s = start / SECTOR_BYTES; s < (start + length) / SECTOR_BYTES; s++) {
      const a = decodeAt(w.volume, s, false);
      const b = decodeAt(replica, s, image === 'durable');
      if (a !== b)
        return `it differs: sector ${s} holds ${name(a)} on the volume, ${name(b)} on the replica (${image})`;
    }
    return 'it differs';
  }

  private async readReplicaState(file: BlockFile, when: string): Promise<ReplicaState> {
    try {
      const { value } = await SlotFile.open(file, 'replica-state', (v) => v as ReplicaState);
      return value;
    } catch (err) {
      this.fail(`the replica state would be unreadable ${when}: ${(err as Error).message}`);
    }
  }

  private fail(message: string): never {
    throw new SimFailure('correctness', message);
  }
}

function decodeAt(disk: SimDisk, s: number, durable: boolean): number {
  const bytes = durable
    ? disk.durableView(s * SECTOR_BYTES, SECTOR_BYTES)
    : disk.view(s * SECTOR_BYTES, SECTOR_BYTES);
  return Workload.decodeImage(() => bytes, 1)[0];
}

function name(held: number): string {
  return held === 0 ? 'zeroes' : held === -1 ? 'garbage' : `write #${held}`;
}

function regionOf(w: World, offset: number): number {
  return Math.floor(offset / w.config.regionSize);
}

/** The durable image of a disk as a read-only BlockFile (what a power loss now keeps for sure). */
function durableFile(disk: SimDisk): BlockFile {
  return {
    size: disk.size,
    read: async (offset, length) => disk.durableView(offset, length).slice(),
    write: async () => {
      throw new Error('read-only');
    },
    sync: async () => {},
  };
}
