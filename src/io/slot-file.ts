/**
 * A small record kept crash-safe in two alternating checksummed slots of a BlockFile: a write
 * goes to the slot not holding the newest record and is synced, so a crash mid-write leaves the
 * previous record whole. Used for the replica's state (it changes at every sync batch: a temp
 * file + rename + two fsyncs per batch would triple the cost) and the primary's pair state.
 *
 * A file with no valid record is an error, never "nothing recorded" (H18): `format` writes the
 * first record when the metadata directory is created.
 *
 * Slot layout (4 KiB): u32 magic | u32 version | u32 seq high | u32 seq low | u32 body length |
 * u32 crc32c (of everything before it and the body) | body (JSON).
 */
import { crc32c } from '@node-rs/crc32';
import { VolrepError } from '../errors.js';
import type { BlockFile } from './block-file.js';

export const SLOT_BYTES = 4096;
export const SLOT_FILE_BYTES = 2 * SLOT_BYTES;
const SLOT_HEADER_BYTES = 24;
export const SLOT_BODY_BYTES_MAX = SLOT_BYTES - SLOT_HEADER_BYTES;
const SLOT_MAGIC = 0x56525354; // 'VRST'
const SLOT_VERSION = 1;

export class SlotFile<T> {
  private seq: number;

  private constructor(
    private readonly file: BlockFile,
    seq: number,
  ) {
    this.seq = seq;
  }

  /** Writes `value` as the only record (slot 1 cleared), durably. */
  static async format<T>(file: BlockFile, value: T): Promise<void> {
    checkSize(file, 'slot file');
    await file.write(0, encodeSlot(value, 0));
    await file.write(SLOT_BYTES, new Uint8Array(SLOT_BYTES));
    await file.sync();
  }

  /**
   * The newest valid record. Refuses a file of the wrong size, one written by a newer volrep,
   * and one with no valid record (torn beyond repair or not ours), naming `name` in the error.
   */
  static async open<T>(
    file: BlockFile,
    name: string,
    validate: (value: unknown) => T | undefined,
  ): Promise<{ slots: SlotFile<T>; value: T }> {
    checkSize(file, name);
    // What a killed process left in the page cache must be durable before the next write goes
    // to the other slot (else a power loss could tear that one with the newest never on disk).
    await file.sync();
    let best: { seq: number; value: T } | undefined;
    let sawNewerVersion = false;
    for (let slot = 0; slot < 2; slot++) {
      const buf = Buffer.from(await file.read(slot * SLOT_BYTES, SLOT_BYTES));
      const decoded = decodeSlot(buf);
      if (decoded === 'newer') {
        sawNewerVersion = true;
        continue;
      }
      if (decoded === undefined) continue;
      const value = validate(decoded.body);
      if (value !== undefined && (best === undefined || decoded.seq > best.seq))
        best = { seq: decoded.seq, value };
    }
    if (best === undefined) {
      if (sawNewerVersion) {
        throw new VolrepError(
          'VOLREP_ERR_META_VERSION',
          `${name} was written by a newer volrep; upgrade volrep`,
        );
      }
      throw new VolrepError(
        'VOLREP_ERR_META',
        `${name} holds no valid record (corrupt or not a volrep file): its state is unknown, so volrep will not guess it`,
      );
    }
    return { slots: new SlotFile<T>(file, best.seq), value: best.value };
  }

  /** Durably replaces the record. Callers must not overlap two writes. */
  async write(value: T): Promise<void> {
    const seq = this.seq + 1;
    await this.file.write((seq % 2) * SLOT_BYTES, encodeSlot(value, seq));
    await this.file.sync();
    this.seq = seq;
  }
}

function checkSize(file: BlockFile, name: string): void {
  if (file.size !== SLOT_FILE_BYTES) {
    throw new VolrepError(
      'VOLREP_ERR_META',
      `${name} has ${file.size} bytes, expected ${SLOT_FILE_BYTES}: truncated or not a volrep file`,
    );
  }
}

function encodeSlot(value: unknown, seq: number): Buffer {
  const body = Buffer.from(JSON.stringify(value));
  if (body.length > SLOT_BODY_BYTES_MAX) throw new RangeError('slot record too large');
  const buf = Buffer.alloc(SLOT_BYTES);
  buf.writeUInt32BE(SLOT_MAGIC, 0);
  buf.writeUInt32BE(SLOT_VERSION, 4);
  buf.writeUInt32BE(Math.floor(seq / 2 ** 32), 8);
  buf.writeUInt32BE(seq >>> 0, 12);
  buf.writeUInt32BE(body.length, 16);
  body.copy(buf, SLOT_HEADER_BYTES);
  buf.writeUInt32BE(crc32c(body, crc32c(buf.subarray(0, 20))) >>> 0, 20);
  return buf;
}

/** A slot's sequence and parsed body; undefined if it is not a whole valid slot. */
function decodeSlot(buf: Buffer): { seq: number; body: unknown } | 'newer' | undefined {
  if (buf.readUInt32BE(0) !== SLOT_MAGIC) return undefined;
  const length = buf.readUInt32BE(16);
  if (length > SLOT_BODY_BYTES_MAX) return undefined;
  const body = buf.subarray(SLOT_HEADER_BYTES, SLOT_HEADER_BYTES + length);
  if (crc32c(body, crc32c(buf.subarray(0, 20))) >>> 0 !== buf.readUInt32BE(20)) return undefined;
  if (buf.readUInt32BE(4) > SLOT_VERSION) return 'newer';
  try {
    return {
      seq: buf.readUInt32BE(8) * 2 ** 32 + buf.readUInt32BE(12),
      body: JSON.parse(body.toString('utf8')),
    };
  } catch {
    return undefined;
  }
}
