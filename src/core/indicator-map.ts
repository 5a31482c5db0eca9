import assert from 'node:assert/strict';
import { VolrepError } from '../errors.js';

/** Bits per word of the backing array. */
const WORD_BITS = 32;

// The byte form (snapshot/load) puts region i in byte i >> 3, bit i & 7. On a little-endian
// host that is exactly the memory layout of the Uint32Array, so snapshots are plain copies.
assert.ok(new Uint8Array(new Uint32Array([1]).buffer)[0] === 1, 'volrep needs a little-endian host');

/** Words per piece of a frozen image: 64 KiB of bits, 524,288 regions. */
export const FROZEN_PIECE_WORDS = 16384;

/** Number of set bits in a 32-bit word. */
function popcount32(x: number): number {
  let v = x - ((x >>> 1) & 0x55555555);
  v = (v & 0x33333333) + ((v >>> 2) & 0x33333333);
  return (((v + (v >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24;
}

/**
 * The indicator bitmap: one bit per region, set while the region may differ from the replica.
 * A running count of set bits makes "how much is dirty" O(1); iteration skips empty words.
 */
export class IndicatorMap {
  readonly regionCount: number;
  private readonly words: Uint32Array;
  /** The image being handed out piece by piece, if any: changes copy its pieces first. */
  private frozen: FrozenBits | null = null;
  private setCount = 0;

  /** `words`: bits to take over (the map then owns them), else all clean. */
  constructor(regionCount: number, words?: Uint32Array) {
    assert.ok(Number.isSafeInteger(regionCount) && regionCount >= 0);
    this.regionCount = regionCount;
    this.words = words ?? new Uint32Array(IndicatorMap.byteLength(regionCount) / 4);
  }

  /** Bytes of the snapshot form for `regionCount` regions (a whole number of 32-bit words). */
  static byteLength(regionCount: number): number {
    return Math.ceil(regionCount / WORD_BITS) * 4;
  }

  /**
   * The regions a snapshot sets, without building a map (one bit per region is 30 MiB for
   * 15 TiB: a copy just to check it would double that). Refuses a snapshot of the wrong size or
   * with bits beyond `regionCount`, like fromBytes.
   */
  static countOf(regionCount: number, bytes: Uint8Array): number {
    const words = IndicatorMap.byteLength(regionCount) / 4;
    if (bytes.length !== words * 4) {
      throw new VolrepError(
        'VOLREP_ERR_BITMAP_SIZE',
        `bitmap has ${bytes.length} bytes, expected ${words * 4} for ${regionCount} regions`,
      );
    }
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const tailBits = regionCount % WORD_BITS;
    if (tailBits !== 0 && view.getUint32((words - 1) * 4, true) >>> tailBits !== 0) {
      throw new VolrepError('VOLREP_ERR_BITMAP_CORRUPT', 'bitmap has bits set beyond the last region');
    }
    let count = 0;
    for (let i = 0; i < words; i++) {
      const word = view.getUint32(i * 4, true);
      if (word !== 0) count += popcount32(word);
    }
    return count;
  }

  /** Builds a map from a snapshot; refuses bits beyond `regionCount` (they would be garbage). */
  static fromBytes(regionCount: number, bytes: Uint8Array): IndicatorMap {
    const map = new IndicatorMap(regionCount);
    map.load(bytes);
    return map;
  }

  /**
   * Like fromBytes, but the map takes `bytes` over instead of copying them (one bit per region
   * is 30 MiB for 15 TiB): the caller must not use them afterwards.
   */
  static adopt(regionCount: number, bytes: Uint8Array): IndicatorMap {
    if (bytes.byteOffset % 4 !== 0 || bytes.length !== IndicatorMap.byteLength(regionCount))
      return IndicatorMap.fromBytes(regionCount, bytes);
    const map = new IndicatorMap(
      regionCount,
      new Uint32Array(bytes.buffer, bytes.byteOffset, bytes.length / 4),
    );
    map.load(bytes);
    return map;
  }

  /** The bits as bytes, without a copy: a view that changes with the map. */
  view(): Uint8Array {
    return new Uint8Array(this.words.buffer, this.words.byteOffset, this.words.byteLength);
  }

  get count(): number {
    return this.setCount;
  }

  test(region: number): boolean {
    this.checkRegion(region);
    return ((this.words[region >>> 5] >>> (region & 31)) & 1) === 1;
  }

  /**
   * The bits as they are now, with `extra` regions set too, to be read piece by piece while the
   * map goes on changing (a checkpoint persists them: one bit per region is 30 MiB for 15 TiB,
   * and a copy of all of it per checkpoint is what this avoids). One at a time; release it.
   */
  freeze(extra: Iterable<number>): FrozenBits {
    assert.ok(this.frozen === null, 'one frozen image at a time');
    const frozen = new FrozenBits(this.words, extra, () => {
      if (this.frozen === frozen) this.frozen = null;
    });
    this.frozen = frozen;
    return frozen;
  }

  /** Sets every bit (a full sync: everything may differ). */
  setAll(): void {
    this.frozen?.preserve(0, this.words.length);
    this.words.fill(0xffffffff);
    const tail = this.regionCount % WORD_BITS;
    if (tail !== 0) this.words[this.words.length - 1] = 2 ** tail - 1;
    this.setCount = this.regionCount;
  }

  /** Sets the bit; returns whether it was already set. */
  set(region: number): boolean {
    this.checkRegion(region);
    const w = region >>> 5;
    const bit = 1 << (region & 31);
    const was = (this.words[w] & bit) !== 0;
    if (!was) {
      this.frozen?.preserve(w, w + 1);
      this.words[w] |= bit;
      this.setCount += 1;
    }
    return was;
  }

  /** Clears the bit; returns whether it was set. */
  reset(region: number): boolean {
    this.checkRegion(region);
    const w = region >>> 5;
    const bit = 1 << (region & 31);
    const was = (this.words[w] & bit) !== 0;
    if (was) {
      this.frozen?.preserve(w, w + 1);
      this.words[w] &= ~bit;
      this.setCount -= 1;
    }
    return was;
  }

  /** The first set region at or after `from`, or -1. Skips whole empty words. */
  nextSet(from: number): number {
    if (from >= this.regionCount) return -1;
    let w = from >>> 5;
    let word = this.words[w] & (0xffffffff << (from & 31));
    for (;;) {
      if (word !== 0) {
        const region = w * WORD_BITS + (31 - Math.clz32(word & -word));
        return region < this.regionCount ? region : -1;
      }
      w += 1;
      if (w >= this.words.length) return -1;
      word = this.words[w];
    }
  }

  /** Set regions in increasing order. */
  *iterate(from = 0): Generator<number> {
    for (let r = this.nextSet(from); r !== -1; r = this.nextSet(r + 1)) yield r;
  }

  /** A copy of the bits as bytes (region i in byte i >> 3, bit i & 7). */
  snapshot(): Uint8Array {
    return new Uint8Array(
      this.words.buffer.slice(this.words.byteOffset, this.words.byteOffset + this.words.byteLength),
    );
  }

  /** Replaces every bit from a snapshot of the same region count. */
  load(bytes: Uint8Array): void {
    // Checked before anything changes: a snapshot refused leaves the map as it was.
    const count = IndicatorMap.countOf(this.regionCount, bytes);
    const view = new Uint8Array(this.words.buffer, this.words.byteOffset, this.words.byteLength);
    this.frozen?.preserve(0, this.words.length);
    if (view.buffer !== bytes.buffer || view.byteOffset !== bytes.byteOffset) view.set(bytes);
    this.setCount = count;
  }

  /** Sets every bit that is set in `bytes` (a snapshot of the same size). */
  union(bytes: Uint8Array): void {
    IndicatorMap.countOf(this.regionCount, bytes);
    const other = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.frozen?.preserve(0, this.words.length);
    for (let i = 0; i < this.words.length; i++) {
      const add = other.getUint32(i * 4, true) & ~this.words[i];
      if (add !== 0) {
        this.words[i] |= add;
        this.setCount += popcount32(add);
      }
    }
  }

  private checkRegion(region: number): void {
    assert.ok(
      Number.isInteger(region) && region >= 0 && region < this.regionCount,
      `region ${region} out of range`,
    );
  }
}

/**
 * An IndicatorMap's bits as they were at its freeze() (plus the extra regions given then), handed
 * out one piece at a time while the map changes: a piece the map changes before it was handed out
 * is copied first (copy-on-write), so only changed pieces cost memory.
 */
export class FrozenBits {
  readonly byteLength: number;
  readonly pieceCount: number;
  /** Pieces the map changed since the freeze, as they were then. */
  private readonly saved = new Map<number, Uint32Array>();
  /** The extra regions, by the piece that holds their bit (each piece looks at its own only). */
  private readonly extra = new Map<number, number[]>();
  /** Pieces below this one were handed out: the map may change them freely. */
  private nextPiece = 0;
  private released = false;

  constructor(
    private readonly words: Uint32Array,
    extra: Iterable<number>,
    private readonly onRelease: () => void,
  ) {
    this.byteLength = words.byteLength;
    this.pieceCount = Math.ceil(words.length / FROZEN_PIECE_WORDS);
    for (const r of extra) {
      const p = Math.floor((r >>> 5) / FROZEN_PIECE_WORDS);
      const list = this.extra.get(p);
      if (list === undefined) this.extra.set(p, [r]);
      else list.push(r);
    }
  }

  /** The map is about to change words [from, to): keep the pieces not handed out yet as they are. */
  preserve(from: number, to: number): void {
    const last = Math.floor((to - 1) / FROZEN_PIECE_WORDS);
    for (let p = Math.max(this.nextPiece, Math.floor(from / FROZEN_PIECE_WORDS)); p <= last; p++) {
      if (!this.saved.has(p))
        this.saved.set(p, this.words.slice(p * FROZEN_PIECE_WORDS, (p + 1) * FROZEN_PIECE_WORDS));
    }
  }

  /** The next piece's bytes as at the freeze, in a buffer of its own (safe to write out while the map changes). */
  take(): Uint8Array {
    assert.ok(!this.released && this.nextPiece < this.pieceCount, 'no piece left');
    const p = this.nextPiece;
    const first = p * FROZEN_PIECE_WORDS;
    const piece = this.saved.get(p) ?? this.words.slice(first, first + FROZEN_PIECE_WORDS);
    this.saved.delete(p);
    this.nextPiece += 1;
    for (const r of this.extra.get(p) ?? []) piece[(r >>> 5) - first] |= 1 << (r & 31);
    this.extra.delete(p);
    return new Uint8Array(piece.buffer, piece.byteOffset, piece.byteLength);
  }

  /** The rest of the image in one buffer, then released (where one copy is no cost: small maps, tests). */
  readAll(): Uint8Array {
    const out = new Uint8Array(this.byteLength);
    for (let at = this.nextPiece * FROZEN_PIECE_WORDS * 4; this.nextPiece < this.pieceCount; ) {
      const piece = this.take();
      out.set(piece, at);
      at += piece.length;
    }
    this.release();
    return out;
  }

  /** Done with it (persisted, or given up): the map stops copying. */
  release(): void {
    this.released = true;
    this.saved.clear();
    this.extra.clear();
    this.onRelease();
  }
}
