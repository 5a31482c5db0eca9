/**
 * The persistent bitmap file: two alternating slots, each a header (sequence, region count,
 * covered log position, update-id limit, checksums) and the indicator bytes. A write goes to
 * the slot not holding the latest bitmap, so a crash mid-write leaves the previous one whole;
 * the valid slot with the highest sequence wins.
 *
 * A write a crash tore can leave its header behind. If a later write to that slot lost its
 * header but landed the same bits, the stale header would read as valid and bring back a
 * bitmap (and a covered log position) that recovery had ruled out. So opening the file wipes,
 * durably, the header of a slot that is newer than the chosen bitmap but not valid, and
 * sequence numbers are never reused. Opening syncs the file first: what a process that was killed
 * left in the page cache must be durable before a write to the other slot relies on it.
 *
 *   slot header: 0 magic 'VOLREPBM'  8 version  12 zero  16 seq  24 region count
 *                32 covered lsn  40 id limit  48 bitmap bytes  56 bitmap crc32c  60 header crc32c
 */
import { crc32c } from '@node-rs/crc32';
import { type FrozenBits, IndicatorMap } from '../core/indicator-map.js';
import { VolrepError } from '../errors.js';
import type { BlockFile } from '../io/block-file.js';

export const BITMAP_MAGIC = 'VOLREPBM';
export const BITMAP_FORMAT_VERSION = 1;
/** Bytes of a slot header; the bitmap follows at this offset within the slot. */
export const BITMAP_SLOT_HEADER_BYTES = 4096;
const HEADER_FIELDS_BYTES = 60;
const SLOT_ALIGN_BYTES = 4096;
const SLOTS = 2;

export interface PersistedBitmap {
  seq: number;
  coveredLsn: number;
  idLimit: number;
  bits: Uint8Array;
}

interface SlotHeader {
  seq: number;
  regionCount: number;
  coveredLsn: number;
  idLimit: number;
  bitmapBytes: number;
  bitmapCrc: number;
}

export class BitmapFile {
  readonly regionCount: number;
  readonly slotBytes: number;
  /** The highest sequence in any slot header, valid bitmap or not. */
  private seq: number;
  /** The slot holding the latest valid bitmap; writes go to the other one. */
  private latestSlot: number;

  private constructor(
    private readonly file: BlockFile,
    regionCount: number,
    seq: number,
    latestSlot: number,
  ) {
    this.regionCount = regionCount;
    this.slotBytes = BitmapFile.slotBytes(regionCount);
    this.seq = seq;
    this.latestSlot = latestSlot;
  }

  static slotBytes(regionCount: number): number {
    const raw = BITMAP_SLOT_HEADER_BYTES + IndicatorMap.byteLength(regionCount);
    return Math.ceil(raw / SLOT_ALIGN_BYTES) * SLOT_ALIGN_BYTES;
  }

  /** Bytes of a bitmap file for `regionCount` regions. */
  static fileBytes(regionCount: number): number {
    return SLOTS * BitmapFile.slotBytes(regionCount);
  }

  /** Writes an all-clean bitmap (sequence 0, slot 0) and invalidates slot 1. */
  static async format(file: BlockFile, regionCount: number, idLimit = 1): Promise<void> {
    checkSize(file, regionCount);
    // The formatted bitmap is sequence 0 in slot 0.
    const bf = new BitmapFile(file, regionCount, -1, 1);
    await file.write(bf.slotBytes, new Uint8Array(BITMAP_SLOT_HEADER_BYTES));
    await bf.persist(new Uint8Array(IndicatorMap.byteLength(regionCount)), 0, idLimit);
  }

  /** Reads the latest valid bitmap. */
  static async open(
    file: BlockFile,
    regionCount: number,
  ): Promise<{ file: BitmapFile; bitmap: PersistedBitmap }> {
    checkSize(file, regionCount);
    // After a process kill the newest slot may be only in the page cache: make what we are about
    // to read durable, or the next persist (to the other slot) could leave no valid slot at all.
    await file.sync();
    const slotBytes = BitmapFile.slotBytes(regionCount);
    const candidates: Array<{ slot: number; h: SlotHeader }> = [];
    const why: string[] = [];
    let seqMax = 0;
    for (let slot = 0; slot < SLOTS; slot++) {
      const d = decodeSlotHeader(await file.read(slot * slotBytes, BITMAP_SLOT_HEADER_BYTES));
      if (typeof d !== 'string') seqMax = Math.max(seqMax, d.seq);
      if (typeof d === 'string') {
        why.push(`slot ${slot}: ${d}`);
      } else if (d.regionCount !== regionCount || d.bitmapBytes !== IndicatorMap.byteLength(regionCount)) {
        why.push(`slot ${slot}: ${d.regionCount} regions, expected ${regionCount}`);
      } else {
        candidates.push({ slot, h: d });
      }
    }
    candidates.sort((a, b) => b.h.seq - a.h.seq);
    for (const { slot, h } of candidates) {
      const bits = await file.read(slot * slotBytes + BITMAP_SLOT_HEADER_BYTES, h.bitmapBytes);
      if (crc32c(bits) !== h.bitmapCrc) {
        why.push(`slot ${slot}: bitmap checksum`);
        continue;
      }
      // Validates the bits beyond the last region too.
      IndicatorMap.countOf(regionCount, bits);
      const other = 1 - slot;
      if (candidates.some((c) => c.slot === other && c.h.seq > h.seq)) {
        await file.write(other * slotBytes, new Uint8Array(BITMAP_SLOT_HEADER_BYTES));
        await file.sync();
      }
      return {
        file: new BitmapFile(file, regionCount, seqMax, slot),
        bitmap: { seq: h.seq, coveredLsn: h.coveredLsn, idLimit: h.idLimit, bits },
      };
    }
    throw new VolrepError('VOLREP_ERR_BITMAP_CORRUPT', `bitmap file has no valid slot (${why.join(', ')})`);
  }

  /** Writes the bitmap to the other slot and syncs it. */
  /** `bits`: a snapshot, or a map's frozen image (written piece by piece; released by the caller). */
  async persist(bits: Uint8Array | FrozenBits, coveredLsn: number, idLimit: number): Promise<void> {
    await this.writeSlot(bits, coveredLsn, idLimit);
    await this.sync();
  }

  /** First half of persist (for simulations that crash in between): the slot, unsynced. */
  async writeSlot(bits: Uint8Array | FrozenBits, coveredLsn: number, idLimit: number): Promise<void> {
    if (bits.byteLength !== IndicatorMap.byteLength(this.regionCount)) {
      throw new VolrepError(
        'VOLREP_ERR_BITMAP_SIZE',
        `bitmap of ${bits.byteLength} bytes for ${this.regionCount} regions`,
      );
    }
    const seq = this.seq + 1;
    const slot = 1 - this.latestSlot;
    this.seq = seq;
    // The bits first, then the header that vouches for them (with their checksum).
    const bitsAt = slot * this.slotBytes + BITMAP_SLOT_HEADER_BYTES;
    let bitsCrc: number;
    if (bits instanceof Uint8Array) {
      bitsCrc = crc32c(bits);
      await this.file.write(bitsAt, bits);
    } else {
      bitsCrc = 0;
      for (let at = 0, p = 0; p < bits.pieceCount; p++) {
        const piece = bits.take();
        bitsCrc = crc32c(piece, bitsCrc);
        await this.file.write(bitsAt + at, piece);
        at += piece.length;
      }
    }
    const header = new Uint8Array(BITMAP_SLOT_HEADER_BYTES);
    const view = new DataView(header.buffer);
    header.set(Buffer.from(BITMAP_MAGIC, 'latin1'), 0);
    view.setUint32(8, BITMAP_FORMAT_VERSION, true);
    view.setBigUint64(16, BigInt(seq), true);
    view.setBigUint64(24, BigInt(this.regionCount), true);
    view.setBigUint64(32, BigInt(coveredLsn), true);
    view.setBigUint64(40, BigInt(idLimit), true);
    view.setBigUint64(48, BigInt(bits.byteLength), true);
    view.setUint32(56, bitsCrc, true);
    view.setUint32(HEADER_FIELDS_BYTES, crc32c(header.subarray(0, HEADER_FIELDS_BYTES)), true);
    await this.file.write(slot * this.slotBytes, header);
    // From here this slot is the latest once synced; until then the other one stays intact
    // only if the next write goes here again, so switch only after the sync.
    this.pendingSlot = slot;
  }

  private pendingSlot: number | null = null;

  async sync(): Promise<void> {
    await this.file.sync();
    if (this.pendingSlot !== null) {
      this.latestSlot = this.pendingSlot;
      this.pendingSlot = null;
    }
  }
}

function checkSize(file: BlockFile, regionCount: number): void {
  if (file.size !== BitmapFile.fileBytes(regionCount)) {
    throw new VolrepError(
      'VOLREP_ERR_BITMAP_SIZE',
      `bitmap file has ${file.size} bytes, expected ${BitmapFile.fileBytes(regionCount)} for ${regionCount} regions`,
    );
  }
}

function decodeSlotHeader(buf: Uint8Array): SlotHeader | string {
  if (Buffer.from(buf.subarray(0, 8)).toString('latin1') !== BITMAP_MAGIC) return 'no magic';
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  // Every format version keeps magic, version and this checksum in place (see format.ts).
  if (view.getUint32(HEADER_FIELDS_BYTES, true) !== crc32c(buf.subarray(0, HEADER_FIELDS_BYTES)))
    return 'checksum';
  const version = view.getUint32(8, true);
  if (version > BITMAP_FORMAT_VERSION) {
    throw new VolrepError(
      'VOLREP_ERR_BITMAP_VERSION',
      `bitmap format version ${version} is newer than this volrep supports (${BITMAP_FORMAT_VERSION}): upgrade volrep`,
    );
  }
  if (version !== BITMAP_FORMAT_VERSION) return `version ${version}`;
  const big = (at: number) => view.getBigUint64(at, true);
  const limit = BigInt(Number.MAX_SAFE_INTEGER);
  if ([16, 24, 32, 40, 48].some((at) => big(at) > limit)) return 'field out of range';
  return {
    seq: Number(big(16)),
    regionCount: Number(big(24)),
    coveredLsn: Number(big(32)),
    idLimit: Number(big(40)),
    bitmapBytes: Number(big(48)),
    bitmapCrc: view.getUint32(56, true),
  };
}
