/**
 * The simulator's client: writes that cross region boundaries and overlap, FUA writes,
 * WRITE_ZEROES, TRIM, FLUSH and library transactions of several writes, at a small queue depth,
 * through the primary node's own entry points. Every data sector it writes says which write it
 * came from (a tag: the write's sequence number and the sector), so a check can read any image
 * of the volume or the replica and tell which write each sector holds.
 *
 * It keeps what the checks need: per sector, the writes completed on it in order; the barriers
 * (FLUSH and FUA) with their issue and completion steps; and what must be durable where.
 */
import type { WriteKind } from '../../src/core/engine.js';
import type { NodeWrite, PrimaryNode } from '../../src/shell/primary-node.js';
import type { Prng } from './prng.js';
import type { Profile } from './world.js';

export const SECTOR_BYTES = 512;
const TAG_MAGIC = 0x56534543; // 'VSEC'

export interface ClientWrite {
  seq: number;
  kind: WriteKind;
  offset: number;
  length: number;
  fua: boolean;
  issueStep: number;
  completeStep: number;
  /** The link's connection count and state when issued (sync mode's check needs both ends in one connection). */
  epochAtIssue: number;
  /** Sync mode: the connection it was issued and completed in (-1: it spanned a link drop, degraded). */
  epochSynced: number;
  /** Secondary power losses before it was issued (one since voids sync mode's "written" promise). */
  secondaryLossesAtIssue: number;
}

export interface Barrier {
  kind: 'flush' | 'fua';
  issueStep: number;
  completeStep: number;
  /** For FUA: the transaction's writes. */
  writes?: ClientWrite[];
}

/** What a sector of an image holds: a write's seq, 0 for zeroes, -1 for bytes no write made. */
export function decodeSector(bytes: Uint8Array): number {
  const view = new DataView(bytes.buffer, bytes.byteOffset, SECTOR_BYTES);
  if (view.getUint32(0) !== TAG_MAGIC) {
    for (let i = 0; i < SECTOR_BYTES; i++) if (bytes[i] !== 0) return -1;
    return 0;
  }
  const seq = view.getUint32(4);
  const sector = view.getUint32(8);
  for (const i of [12, 100, 300, 511]) if (bytes[i] !== patternByte(seq, sector, i)) return -1;
  return seq;
}

function patternByte(seq: number, sector: number, i: number): number {
  return (Math.imul(seq, 2654435761) + Math.imul(sector, 40503) + Math.imul(i, 97)) >>> 24;
}

function fillSectors(buf: Uint8Array, seq: number, firstSector: number): void {
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  for (let at = 0; at < buf.length; at += SECTOR_BYTES) {
    const sector = firstSector + at / SECTOR_BYTES;
    for (let i = 12; i < SECTOR_BYTES; i++) buf[at + i] = patternByte(seq, sector, i);
    view.setUint32(at, TAG_MAGIC);
    view.setUint32(at + 4, seq);
    view.setUint32(at + 8, sector);
  }
}

/** Per-sector requirement: the image must hold this write or a newer one (zero writes count as zeroes). */
export interface Requirement {
  seq: number;
  zero: boolean;
}

export class Workload {
  readonly sectors: number;
  readonly writes = new Map<number, ClientWrite>();
  readonly barriers: Barrier[] = [];
  /** Per sector: completed writes in completion order. */
  readonly completed: ClientWrite[][];
  /** Per sector: the newest zero/trim write issued to it. */
  readonly lastZeroSeq: Int32Array;
  /** What a FLUSH or FUA made durable on the primary's volume. */
  readonly primaryDurable: Array<Requirement | undefined>;
  /** Sync mode: what a FUA completion or a FLUSH promised is on the replica's durable image. */
  replicaDurable: Array<Requirement | undefined>;
  /**
   * Sync mode: what a completion without FUA promised is written on the replica (in its page
   * cache, not necessarily durable: void after the secondary loses power).
   */
  replicaWritten: Array<Requirement | undefined>;
  /** Bumped whenever a requirement changes (lets checks skip work). */
  requirementsVersion = 0;
  outstanding = 0;
  /** Transactions of the current primary whose data the node has not let go of yet. */
  unreleased = 0;
  submitted = 0;
  private readonly powerLossSteps: number[] = [];
  private secondaryLosses = 0;
  /** A request failed: the node reported an error to its client (never expected here). */
  error: Error | undefined;
  private seq = 0;
  /** Requests of the current primary incarnation; a dead primary's never complete. */
  private incarnation = 0;

  constructor(
    volumeSize: number,
    private readonly regionSize: number,
    private readonly syncMode: boolean,
    private readonly profile: Profile,
    private readonly trace: (line: string) => void,
  ) {
    this.sectors = volumeSize / SECTOR_BYTES;
    this.completed = Array.from({ length: this.sectors }, () => []);
    this.lastZeroSeq = new Int32Array(this.sectors);
    this.primaryDurable = new Array(this.sectors).fill(undefined);
    this.replicaDurable = new Array(this.sectors).fill(undefined);
    this.replicaWritten = new Array(this.sectors).fill(undefined);
  }

  /** The secondary lost power: what was only written there (not synced) may be gone. */
  secondaryPowerLost(): void {
    this.secondaryLosses += 1;
    this.replicaWritten = new Array(this.sectors).fill(undefined);
    this.requirementsVersion += 1;
  }

  /** The primary is gone: what it had in flight will never complete. */
  abandon(): void {
    this.incarnation += 1;
    this.outstanding = 0;
    this.unreleased = 0;
  }

  /**
   * The primary lost power at `step`: sync mode's promise was checked at that instant and is
   * void from here, and writes completed before it may be gone (unless a barrier had made them
   * durable), so later barriers cover only what completed after it.
   */
  powerLost(step: number): void {
    this.powerLossSteps.push(step);
    this.replicaDurable = new Array(this.sectors).fill(undefined);
    this.replicaWritten = new Array(this.sectors).fill(undefined);
    this.requirementsVersion += 1;
  }

  /** Requests completed (for scripted tests that wait for one). */
  completedCount = 0;

  /** Submits the given writes as one transaction (scripted tests). */
  submitExact(
    node: PrimaryNode,
    writes: Array<{ firstSector: number; sectors: number; kind: WriteKind }>,
    fua: boolean,
    step: () => number,
    epoch: () => number,
  ): void {
    this.send(
      node,
      writes.map((w) => ({ first: w.firstSector, n: w.sectors, kind: w.kind })),
      fua,
      step,
      epoch,
    );
  }

  /** Submits one request to the primary. */
  submit(node: PrimaryNode, prng: Prng, step: () => number, epoch: () => number): void {
    const r = prng.next() / 2 ** 32;
    if (r < this.profile.flushShare) {
      const incarnation = this.incarnation;
      const alive = () => incarnation === this.incarnation;
      this.outstanding += 1;
      this.submitted += 1;
      const issueStep = step();
      const epochAtIssue = epoch();
      this.trace(`client FLUSH`);
      node.flush((err) => {
        if (!alive()) return;
        this.outstanding -= 1;
        this.completedCount += 1;
        if (err) this.error ??= err;
        else this.completeFlush(issueStep, step(), epochAtIssue === epoch() ? epochAtIssue : -1);
      });
      return;
    }
    const library = this.profile.txWritesMax > 1 && r < this.profile.flushShare + 0.2;
    const count = library ? 2 + prng.int(this.profile.txWritesMax - 1) : 1;
    const fua = prng.chance(this.profile.fuaChance);
    const picks: Array<{ first: number; n: number; kind: WriteKind }> = [];
    for (let i = 0; i < count; i++) {
      const k = prng.int(100);
      const kind: WriteKind = k < 78 ? 'data' : k < 90 ? 'zero' : 'trim';
      const span = prng.chance(0.25) ? (2 * this.regionSize) / SECTOR_BYTES : 8;
      const first = prng.int(this.sectors);
      picks.push({ first, n: 1 + prng.int(Math.min(span, this.sectors - first)), kind });
    }
    this.send(node, picks, fua, step, epoch);
  }

  private send(
    node: PrimaryNode,
    picks: Array<{ first: number; n: number; kind: WriteKind }>,
    fua: boolean,
    step: () => number,
    epoch: () => number,
  ): void {
    const incarnation = this.incarnation;
    const alive = () => incarnation === this.incarnation;
    this.outstanding += 1;
    this.submitted += 1;
    const count = picks.length;
    const writes: ClientWrite[] = [];
    const nodeWrites: NodeWrite[] = [];
    for (const { first, n, kind } of picks) {
      const w: ClientWrite = {
        seq: ++this.seq,
        kind,
        offset: first * SECTOR_BYTES,
        length: n * SECTOR_BYTES,
        fua,
        issueStep: step(),
        completeStep: -1,
        epochAtIssue: epoch(),
        epochSynced: -1,
        secondaryLossesAtIssue: this.secondaryLosses,
      };
      writes.push(w);
      this.writes.set(w.seq, w);
      if (kind !== 'data') {
        for (let s = first; s < first + n; s++) this.lastZeroSeq[s] = w.seq;
        nodeWrites.push({ offset: w.offset, kind, length: w.length });
      } else {
        const buf = new Uint8Array(w.length);
        fillSectors(buf, w.seq, first);
        nodeWrites.push({ offset: w.offset, kind, length: w.length, data: [buf] });
      }
    }
    this.trace(
      `client ${count > 1 ? 'transaction ' : ''}${writes.map((w) => `#${w.seq} ${w.kind} ${w.offset / SECTOR_BYTES}+${w.length / SECTOR_BYTES}`).join(', ')}${fua ? ' FUA' : ''}`,
    );
    // The node lends the data back once it reads it no more; a reused receive buffer would then
    // be written over, so the memory is scribbled on: a node that lets go too early sends or
    // writes the scribble, which the checks see.
    let released = false;
    this.unreleased += 1;
    node.submit(
      nodeWrites,
      { fua },
      (err) => {
        if (!alive()) return;
        this.outstanding -= 1;
        this.completedCount += 1;
        if (err) this.error ??= err;
        else this.completeWrites(writes, step(), epoch());
      },
      (reusable) => {
        if (!alive()) return;
        if (released) this.error ??= new Error(`transaction #${writes[0].seq}: its data was released twice`);
        released = true;
        this.unreleased -= 1;
        if (reusable) for (const w of nodeWrites) for (const piece of w.data ?? []) piece.fill(0xa5);
      },
    );
  }

  private completeWrites(writes: ClientWrite[], at: number, epochNow: number): void {
    this.requirementsVersion += 1;
    for (const w of writes) {
      w.completeStep = at;
      const first = w.offset / SECTOR_BYTES;
      const req: Requirement = { seq: w.seq, zero: w.kind !== 'data' };
      for (let s = first; s < first + w.length / SECTOR_BYTES; s++) {
        this.completed[s].push(w);
        if (w.fua) raise(this.primaryDurable, s, req);
        // Sync mode: complete means written on the replica, and durable there with FUA — for a
        // write that stayed within one connection (one that spans a link drop completes
        // locally, degraded, by design). A completion after the secondary lost power (the link
        // not yet known dead) rests on a "written" sent before the loss: void, as the README says.
        if (this.syncMode && epochNow > 0 && epochNow === w.epochAtIssue) {
          w.epochSynced = epochNow;
          if (w.fua) raise(this.replicaDurable, s, req);
          else if (w.secondaryLossesAtIssue === this.secondaryLosses) raise(this.replicaWritten, s, req);
        }
      }
    }
    if (writes[0].fua)
      this.barriers.push({ kind: 'fua', issueStep: writes[0].issueStep, completeStep: at, writes });
    this.trace(`client done #${writes.map((w) => w.seq).join(',#')}`);
  }

  /** `epoch`: the connection the FLUSH was issued and completed in (-1: none, or it spanned a drop). */
  private completeFlush(issueStep: number, at: number, epoch: number): void {
    this.requirementsVersion += 1;
    for (let s = 0; s < this.sectors; s++) {
      const w = this.latestCompletedBefore(s, issueStep);
      if (w === undefined) continue;
      const req = { seq: w.seq, zero: w.kind !== 'data' };
      raise(this.primaryDurable, s, req);
      // Sync mode: a FLUSH makes durable on the replica what its connection wrote there.
      if (this.syncMode && epoch > 0 && w.epochSynced === epoch) raise(this.replicaDurable, s, req);
    }
    this.barriers.push({ kind: 'flush', issueStep, completeStep: at });
    this.trace('client FLUSH done');
  }

  /**
   * The newest write completed on sector `s` before `step` (completions are in step order), if
   * no primary power loss came between it and `step`.
   */
  latestCompletedBefore(s: number, step: number): ClientWrite | undefined {
    let lostAt = -1;
    for (const p of this.powerLossSteps) if (p < step) lostAt = p;
    const list = this.completed[s];
    let lo = 0;
    let hi = list.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (list[mid].completeStep < step) lo = mid + 1;
      else hi = mid;
    }
    const w = lo > 0 ? list[lo - 1] : undefined;
    return w !== undefined && w.completeStep > lostAt ? w : undefined;
  }

  /**
   * Why sector `s` holding `held` (decodeSector's answer) breaks `req`, or undefined if it does
   * not: it must hold the required write or a newer one; zeroes pass only if a zero write newer
   * than the requirement was issued there (or the requirement is a zero write).
   */
  violates(s: number, held: number, req: Requirement | undefined): string | undefined {
    if (req === undefined) return undefined;
    if (held === -1) return `sector ${s} holds bytes no write made (needs #${req.seq} or newer)`;
    if (held === 0) {
      if (req.zero || this.lastZeroSeq[s] > req.seq) return undefined;
      return `sector ${s} holds zeroes, but needs write #${req.seq} or newer`;
    }
    if (held >= req.seq) return undefined;
    return `sector ${s} holds write #${held}, older than #${req.seq} that it must hold (or newer)`;
  }

  static decodeImage(image: (offset: number, length: number) => Uint8Array, sectors: number): Int32Array {
    const out = new Int32Array(sectors);
    for (let s = 0; s < sectors; s++) out[s] = decodeSector(image(s * SECTOR_BYTES, SECTOR_BYTES));
    return out;
  }
}

function raise(reqs: Array<Requirement | undefined>, s: number, req: Requirement): void {
  const cur = reqs[s];
  if (cur === undefined || req.seq > cur.seq) reqs[s] = req;
}
