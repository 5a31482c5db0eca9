import assert from 'node:assert/strict';
import type { BlockFile } from '../../src/io/block-file.js';
import type { Prng } from './prng.js';

/** How an unsynced write ends up after a power loss (FoundationDB's AsyncFileNonDurable). */
export type TearMode = 'whole' | 'absent' | 'partial' | 'corrupt';

interface UnsyncedWrite {
  offset: number;
  /** A private copy (never a view of the caller's buffer). */
  data: Uint8Array;
  /** Order of completion: a sync makes a prefix of them durable. */
  seq: number;
  /** What the write belongs to (the simulator tags replica writes with their update id). */
  tag: number;
}

export interface SimDiskOptions {
  /**
   * Writes survive a power loss in whole units of this many bytes (512: a disk's atomic sector;
   * 1: any byte boundary, the harshest model, for metadata files).
   */
  atomicBytes?: number;
  /** Tear modes a power loss may pick (data disks do not garble a sector). */
  modes?: readonly TearMode[];
}

const ALL_MODES: readonly TearMode[] = ['whole', 'absent', 'partial', 'corrupt'];

/** A private copy of bytes (Buffer#slice would be a view). */
function copyOf(data: Uint8Array): Uint8Array {
  return new Uint8Array(data);
}

/**
 * An in-memory disk with a page cache: reads see every completed write (`current`), a sync makes
 * durable what completed before it was issued, the kernel's writeback may make any unsynced write
 * durable at any time (`writeback`), a process kill keeps the page cache, and a power loss
 * (`crash`) keeps the durable image plus, for each unsynced write, a choice drawn from the PRNG:
 * whole, absent, a prefix of it (torn), or with some bytes garbled.
 */
export class SimDisk implements BlockFile {
  readonly size: number;
  readonly atomicBytes: number;
  readonly modes: readonly TearMode[];
  private current: Uint8Array;
  private durable: Uint8Array;
  private unsynced: UnsyncedWrite[] = [];
  private writeSeq = 0;
  /** Bumped by every change of the durable image (lets checks skip work when nothing changed). */
  durableVersion = 0;
  /** Bumped by every change at all. */
  version = 0;
  /** Called with the tag of each write once it is in the page cache, and once it is durable whole. */
  onWritten: ((tag: number) => void) | null = null;
  onDurable: ((tag: number) => void) | null = null;
  /** Counters for tests. */
  writes = 0;
  syncs = 0;

  constructor(size: number, options: SimDiskOptions = {}) {
    this.size = size;
    this.atomicBytes = options.atomicBytes ?? 1;
    this.modes = options.modes ?? ALL_MODES;
    this.current = new Uint8Array(size);
    this.durable = new Uint8Array(size);
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    return this.readSync(offset, length);
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    this.writeSync(offset, data);
  }

  async sync(): Promise<void> {
    this.syncSync();
  }

  readSync(offset: number, length: number): Uint8Array {
    assert.ok(offset >= 0 && length >= 0 && offset + length <= this.size, 'read outside the disk');
    return this.current.slice(offset, offset + length);
  }

  /** A view of the page cache (do not keep or change it). */
  view(offset: number, length: number): Uint8Array {
    return this.current.subarray(offset, offset + length);
  }

  /** A view of what a power loss now would keep for sure (do not keep or change it). */
  durableView(offset: number, length: number): Uint8Array {
    return this.durable.subarray(offset, offset + length);
  }

  writeSync(offset: number, data: Uint8Array, tag = 0): void {
    assert.ok(offset >= 0 && offset + data.length <= this.size, 'write outside the disk');
    this.current.set(data, offset);
    this.writeSeq += 1;
    this.unsynced.push({ offset, data: copyOf(data), seq: this.writeSeq, tag });
    if (tag !== 0) this.onWritten?.(tag);
    this.writes += 1;
    this.version += 1;
  }

  /** The sequence of the last completed write: a sync issued now covers it and all before. */
  get lastWriteSeq(): number {
    return this.writeSeq;
  }

  syncSync(): void {
    this.syncUpTo(this.writeSeq);
  }

  /** A sync issued when `seq` was the last completed write finishes: those writes are durable. */
  syncUpTo(seq: number): void {
    let n = 0;
    while (n < this.unsynced.length && this.unsynced[n].seq <= seq) n++;
    for (const w of this.unsynced.splice(0, n)) this.makeDurable(w);
    this.syncs += 1;
    this.version += 1;
  }

  /** Unsynced writes pending. */
  get unsyncedWrites(): number {
    return this.unsynced.length;
  }

  /** Ranges of the unsynced writes (for region-level checks). */
  unsyncedRanges(): Array<[number, number]> {
    return this.unsynced.map((w) => [w.offset, w.data.length]);
  }

  /**
   * The kernel writes one unsynced write back (and every older unsynced write it overlaps, so
   * the durable image stays one the page cache has passed through). False if there was none.
   */
  writeback(prng: Prng): boolean {
    if (this.unsynced.length === 0) return false;
    const pick = prng.int(this.unsynced.length);
    const chosen = new Set<number>([pick]);
    for (let i = pick; i >= 0; i--) {
      if (!chosen.has(i)) continue;
      const w = this.unsynced[i];
      for (let j = 0; j < i; j++) {
        const o = this.unsynced[j];
        if (o.offset < w.offset + w.data.length && w.offset < o.offset + o.data.length) chosen.add(j);
      }
    }
    for (const i of [...chosen].sort((a, b) => a - b)) this.makeDurable(this.unsynced[i]);
    this.unsynced = this.unsynced.filter((_, i) => !chosen.has(i));
    this.version += 1;
    return true;
  }

  /**
   * Power loss: returns what each unsynced write became. Afterwards the disk holds the durable
   * image with the surviving pieces applied in their original order.
   */
  crash(prng: Prng, modes: readonly TearMode[] = this.modes): TearMode[] {
    return this.crashWith(prng, () => prng.pick(modes));
  }

  /** Power loss with the outcome of the i-th unsynced write given (tests of one interleaving). */
  crashPlanned(outcomes: readonly TearMode[], prng: Prng): TearMode[] {
    assert.equal(outcomes.length, this.unsynced.length, 'one outcome per unsynced write');
    return this.crashWith(prng, (i) => outcomes[i]);
  }

  /** A copy that shares nothing (to crash it without touching this one). */
  clone(): SimDisk {
    const copy = new SimDisk(this.size, { atomicBytes: this.atomicBytes, modes: this.modes });
    copy.current = copyOf(this.current);
    copy.durable = copyOf(this.durable);
    copy.unsynced = this.unsynced.map((w) => ({ ...w, data: copyOf(w.data) }));
    copy.writeSeq = this.writeSeq;
    return copy;
  }

  /** The bytes as they are (for tests that corrupt a file on purpose). */
  poke(offset: number, data: Uint8Array): void {
    this.current.set(data, offset);
    this.durable.set(data, offset);
    this.version += 1;
    this.durableVersion += 1;
  }

  private makeDurable(w: UnsyncedWrite): void {
    this.durable.set(w.data, w.offset);
    this.durableVersion += 1;
    if (w.tag !== 0) this.onDurable?.(w.tag);
  }

  private crashWith(prng: Prng, choose: (i: number) => TearMode): TearMode[] {
    const image = copyOf(this.durable);
    const outcomes: TearMode[] = [];
    const unit = this.atomicBytes;
    for (const [i, w] of this.unsynced.entries()) {
      const mode = choose(i);
      outcomes.push(mode);
      if (mode === 'whole') {
        image.set(w.data, w.offset);
        if (w.tag !== 0) this.onDurable?.(w.tag);
      } else if (mode === 'partial') {
        // A prefix, cut at a boundary of the disk's atomic unit (counted from the disk's start).
        const end = w.offset + prng.int(w.data.length + 1);
        const cut = Math.max(w.offset, Math.floor(end / unit) * unit);
        image.set(w.data.subarray(0, cut - w.offset), w.offset);
      } else if (mode === 'corrupt') {
        const garbled = copyOf(w.data);
        const flips = 1 + prng.int(4);
        for (let k = 0; k < flips && garbled.length > 0; k++)
          garbled[prng.int(garbled.length)] ^= 1 + prng.int(255);
        image.set(garbled, w.offset);
      }
    }
    this.durable = image;
    this.current = copyOf(image);
    this.unsynced = [];
    this.version += 1;
    this.durableVersion += 1;
    return outcomes;
  }
}
