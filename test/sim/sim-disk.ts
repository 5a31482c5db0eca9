import assert from 'node:assert/strict';
import type { BlockFile } from '../../src/io/block-file.js';
import type { Prng } from './prng.js';

/** How an unsynced write ends up after a power loss (FoundationDB's AsyncFileNonDurable). */
export type TearMode = 'whole' | 'absent' | 'partial' | 'corrupt';

/**
 * An in-memory disk that models power loss: reads see every write, `sync` makes them durable,
 * and `crash` keeps the durable image plus, for each unsynced write, a choice drawn from the
 * PRNG: whole, absent, a prefix of it (torn), or with some bytes garbled.
 */
export class SimDisk implements BlockFile {
  readonly size: number;
  private current: Uint8Array;
  private durable: Uint8Array;
  private unsynced: Array<{ offset: number; data: Uint8Array }> = [];
  /** Counters for tests. */
  writes = 0;
  syncs = 0;

  constructor(size: number) {
    this.size = size;
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

  writeSync(offset: number, data: Uint8Array): void {
    assert.ok(offset >= 0 && offset + data.length <= this.size, 'write outside the disk');
    this.current.set(data, offset);
    this.unsynced.push({ offset, data: data.slice() });
    this.writes += 1;
  }

  syncSync(): void {
    this.durable.set(this.current);
    this.unsynced = [];
    this.syncs += 1;
  }

  /** Unsynced writes pending (for tests). */
  get unsyncedWrites(): number {
    return this.unsynced.length;
  }

  /**
   * Power loss: returns what each unsynced write became. Afterwards the disk holds the durable
   * image with the surviving pieces applied in their original order.
   */
  crash(prng: Prng, modes: readonly TearMode[] = ['whole', 'absent', 'partial', 'corrupt']): TearMode[] {
    return this.crashWith(prng, () => prng.pick(modes));
  }

  /** Power loss with the outcome of the i-th unsynced write given (tests of one interleaving). */
  crashPlanned(outcomes: readonly TearMode[], prng: Prng): TearMode[] {
    assert.equal(outcomes.length, this.unsynced.length, 'one outcome per unsynced write');
    return this.crashWith(prng, (i) => outcomes[i]);
  }

  private crashWith(prng: Prng, choose: (i: number) => TearMode): TearMode[] {
    const image = this.durable.slice();
    const outcomes: TearMode[] = [];
    for (const [i, w] of this.unsynced.entries()) {
      const mode = choose(i);
      outcomes.push(mode);
      if (mode === 'whole') {
        image.set(w.data, w.offset);
      } else if (mode === 'partial') {
        image.set(w.data.subarray(0, prng.int(w.data.length + 1)), w.offset);
      } else if (mode === 'corrupt') {
        const garbled = w.data.slice();
        const flips = 1 + prng.int(4);
        for (let i = 0; i < flips && garbled.length > 0; i++)
          garbled[prng.int(garbled.length)] ^= 1 + prng.int(255);
        image.set(garbled, w.offset);
      }
    }
    this.durable = image;
    this.current = image.slice();
    this.unsynced = [];
    return outcomes;
  }

  /** The bytes as they are (for tests that corrupt a file on purpose). */
  poke(offset: number, data: Uint8Array): void {
    this.current.set(data, offset);
    this.durable.set(data, offset);
  }
}
