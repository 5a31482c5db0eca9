/**
 * A small record kept crash-safe in two alternating checksummed slots: a write goes to the slot not
 * holding the newest record and is synced, so a crash mid-write leaves the previous record whole.
 * Used for the replica's state, which changes at every sync batch (a temp file + rename + two
 * fsyncs per batch would triple the cost).
 *
 * Slot layout (4 KiB): u32 magic | u32 version | u32 seq high | u32 seq low | u32 body length |
 * u32 crc32c (of everything before it and the body) | body (JSON).
 */
import { promises as fsp } from 'node:fs';
import { crc32c } from '@node-rs/crc32';
import { errnoCode, VolrepError } from '../util/errors.js';

export const SLOT_BYTES = 4096;
const SLOT_HEADER_BYTES = 24;
export const SLOT_BODY_BYTES_MAX = SLOT_BYTES - SLOT_HEADER_BYTES;
const SLOT_MAGIC = 0x56525354; // 'VRST'
const SLOT_VERSION = 1;

export class SlotFile<T> {
  private seq = 0;

  private constructor(
    private readonly handle: fsp.FileHandle,
    private readonly file: string,
    private readonly validate: (value: unknown) => T | undefined,
  ) {}

  /** Opens (creating if absent) and returns the newest valid record, or undefined if there is none. */
  static async open<T>(
    file: string,
    validate: (value: unknown) => T | undefined,
  ): Promise<{ slots: SlotFile<T>; value: T | undefined }> {
    let handle: fsp.FileHandle;
    try {
      handle = await fsp.open(file, 'r+');
    } catch (err) {
      if (errnoCode(err) !== 'ENOENT') throw err;
      handle = await fsp.open(file, 'w+', 0o644);
      await handle.truncate(2 * SLOT_BYTES);
      await handle.sync();
    }
    const slots = new SlotFile(handle, file, validate);
    const value = await slots.load();
    return { slots, value };
  }

  private async load(): Promise<T | undefined> {
    let best: { seq: number; value: T } | undefined;
    let sawNewerVersion = false;
    for (let slot = 0; slot < 2; slot++) {
      const buf = Buffer.alloc(SLOT_BYTES);
      const { bytesRead } = await this.handle.read(buf, 0, SLOT_BYTES, slot * SLOT_BYTES);
      if (bytesRead < SLOT_HEADER_BYTES || buf.readUInt32BE(0) !== SLOT_MAGIC) continue;
      if (buf.readUInt32BE(4) > SLOT_VERSION) {
        sawNewerVersion = true;
        continue;
      }
      const seq = buf.readUInt32BE(8) * 2 ** 32 + buf.readUInt32BE(12);
      const length = buf.readUInt32BE(16);
      if (length > SLOT_BODY_BYTES_MAX || SLOT_HEADER_BYTES + length > bytesRead) continue;
      const body = buf.subarray(SLOT_HEADER_BYTES, SLOT_HEADER_BYTES + length);
      if (crc32c(body, crc32c(buf.subarray(0, 20))) >>> 0 !== buf.readUInt32BE(20)) continue;
      let parsed: unknown;
      try {
        parsed = JSON.parse(body.toString('utf8'));
      } catch {
        continue;
      }
      const value = this.validate(parsed);
      if (value !== undefined && (best === undefined || seq > best.seq)) best = { seq, value };
    }
    if (best === undefined && sawNewerVersion) {
      throw new VolrepError(
        'VOLREP_ERR_META_VERSION',
        `${this.file} was written by a newer volrep; upgrade volrep`,
      );
    }
    this.seq = best?.seq ?? 0;
    return best?.value;
  }

  /** Durably replaces the record. Callers must not overlap two writes. */
  async write(value: T): Promise<void> {
    const body = Buffer.from(JSON.stringify(value));
    if (body.length > SLOT_BODY_BYTES_MAX) throw new RangeError('slot record too large');
    const seq = this.seq + 1;
    const buf = Buffer.alloc(SLOT_BYTES);
    buf.writeUInt32BE(SLOT_MAGIC, 0);
    buf.writeUInt32BE(SLOT_VERSION, 4);
    buf.writeUInt32BE(Math.floor(seq / 2 ** 32), 8);
    buf.writeUInt32BE(seq >>> 0, 12);
    buf.writeUInt32BE(body.length, 16);
    body.copy(buf, SLOT_HEADER_BYTES);
    buf.writeUInt32BE(crc32c(body, crc32c(buf.subarray(0, 20))) >>> 0, 20);
    await this.handle.write(buf, 0, SLOT_BYTES, (seq % 2) * SLOT_BYTES);
    await this.handle.datasync();
    this.seq = seq;
  }

  async close(): Promise<void> {
    await this.handle.close();
  }
}
