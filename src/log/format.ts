/**
 * The log file's byte format.
 *
 *   [header slot 0][header slot 1][circular record area of `capacity` bytes]
 *
 * A header slot: magic, format version, epoch, sequence, capacity, tail lsn, id limit, crc32c. The two
 * slots are written alternately, so a torn header write leaves the other one whole; the valid
 * slot with the highest sequence wins.
 *
 * A record (all integers little-endian, lsn = position in the endless log stream, which maps to
 * byte `lsn % capacity` of the record area; a record may wrap around the end):
 *
 *   0 crc32c of bytes 4..length   4 length   8 type   9..11 zero   12 epoch   16 lsn
 *   24 id limit   32 payload (see records.ts)
 *
 * The lsn doubles as the record's sequence number: a record is valid only where the scan
 * expects it, so stale bytes from an earlier lap around the ring never pass for a record.
 * The epoch counts opens of the log: a crash can leave whole records beyond a torn one, and
 * once the next boot's records reach them they would line up again; epochs along the log
 * never decrease, so such leftovers of an earlier boot end the scan instead.
 */
import { crc32c } from '@node-rs/crc32';
import {
  type LogRecord,
  RECORD_COMPLETE_ENTRY_BYTES,
  RECORD_COMPLETES_MAX,
  RECORD_HEADER_BYTES,
  RECORD_LIST_PREFIX_BYTES,
  RECORD_RANGE_BYTES,
  RECORD_RANGES_MAX,
  RecordType,
  recordBytes,
} from '../core/records.js';
import { VolrepError } from '../errors.js';

export const LOG_MAGIC = 'VOLREPLG';
export const LOG_FORMAT_VERSION = 1;
/** Bytes per header slot; a whole sector so slots never share one. */
export const LOG_HEADER_SLOT_BYTES = 4096;
export const LOG_HEADER_SLOTS = 2;
export const LOG_DATA_OFFSET = LOG_HEADER_SLOT_BYTES * LOG_HEADER_SLOTS;
/** Bytes of the header that the checksum covers (it is stored right after them). */
const HEADER_FIELDS_BYTES = 48;
/** The largest record the format allows (a begin record with every range). */
export const RECORD_BYTES_MAX =
  RECORD_HEADER_BYTES + RECORD_LIST_PREFIX_BYTES + RECORD_RANGES_MAX * RECORD_RANGE_BYTES;
/** Largest integer a u64 field may hold here (lsns and ids stay within doubles' exact range). */
const U64_SAFE_MAX = Number.MAX_SAFE_INTEGER;

export interface LogHeader {
  version: number;
  /** Incremented, durably, each time the log is opened. */
  epoch: number;
  seq: number;
  capacity: number;
  tailLsn: number;
  idLimit: number;
}

function writeU64(view: DataView, at: number, value: number): void {
  view.setBigUint64(at, BigInt(value), true);
}

/** Reads a u64; undefined when it exceeds 2^53 (never written by this code: corrupt). */
function readU64(view: DataView, at: number): number | undefined {
  const v = view.getBigUint64(at, true);
  return v > BigInt(U64_SAFE_MAX) ? undefined : Number(v);
}

export function encodeHeader(h: LogHeader): Uint8Array {
  const buf = new Uint8Array(LOG_HEADER_SLOT_BYTES);
  const view = new DataView(buf.buffer);
  buf.set(Buffer.from(LOG_MAGIC, 'latin1'), 0);
  view.setUint32(8, h.version, true);
  view.setUint32(12, h.epoch, true);
  writeU64(view, 16, h.seq);
  writeU64(view, 24, h.capacity);
  writeU64(view, 32, h.tailLsn);
  writeU64(view, 40, h.idLimit);
  view.setUint32(HEADER_FIELDS_BYTES, crc32c(buf.subarray(0, HEADER_FIELDS_BYTES)), true);
  return buf;
}

export type HeaderDecode =
  | { kind: 'ok'; header: LogHeader }
  | { kind: 'newer'; version: number }
  | { kind: 'invalid'; why: string };

/** Decodes one header slot without throwing: a slot may be torn, and the other one counts. */
export function decodeHeader(buf: Uint8Array): HeaderDecode {
  if (buf.length < HEADER_FIELDS_BYTES + 4) return { kind: 'invalid', why: 'short' };
  if (Buffer.from(buf.subarray(0, 8)).toString('latin1') !== LOG_MAGIC)
    return { kind: 'invalid', why: 'magic' };
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  // Every format version keeps magic, version and this checksum where they are, so a torn
  // slot is told apart from a newer format.
  if (view.getUint32(HEADER_FIELDS_BYTES, true) !== crc32c(buf.subarray(0, HEADER_FIELDS_BYTES))) {
    return { kind: 'invalid', why: 'checksum' };
  }
  const version = view.getUint32(8, true);
  if (version > LOG_FORMAT_VERSION) return { kind: 'newer', version };
  if (version !== LOG_FORMAT_VERSION) return { kind: 'invalid', why: `version ${version}` };
  const seq = readU64(view, 16);
  const capacity = readU64(view, 24);
  const tailLsn = readU64(view, 32);
  const idLimit = readU64(view, 40);
  if (seq === undefined || capacity === undefined || tailLsn === undefined || idLimit === undefined) {
    return { kind: 'invalid', why: 'field out of range' };
  }
  return {
    kind: 'ok',
    header: { version, epoch: view.getUint32(12, true), seq, capacity, tailLsn, idLimit },
  };
}

/** Encodes a record; its length is exactly `recordBytes(record)`. */
export function encodeRecord(record: LogRecord, epoch = 0): Uint8Array {
  const length = recordBytes(record);
  const buf = new Uint8Array(length);
  const view = new DataView(buf.buffer);
  view.setUint32(4, length, true);
  view.setUint8(8, RecordType[record.type]);
  view.setUint32(12, epoch, true);
  writeU64(view, 16, record.lsn);
  writeU64(view, 24, record.idLimit);
  let at = RECORD_HEADER_BYTES;
  switch (record.type) {
    case 'begin':
      view.setUint32(at, record.ranges.length, true);
      at += RECORD_LIST_PREFIX_BYTES;
      for (const [first, count] of record.ranges) {
        writeU64(view, at, first);
        writeU64(view, at + 8, count);
        at += RECORD_RANGE_BYTES;
      }
      break;
    case 'complete':
      view.setUint32(at, record.begins.length, true);
      at += RECORD_LIST_PREFIX_BYTES;
      for (const lsn of record.begins) {
        writeU64(view, at, lsn);
        at += RECORD_COMPLETE_ENTRY_BYTES;
      }
      break;
    case 'checkpoint':
      writeU64(view, at, record.checkpointId);
      writeU64(view, at + 8, record.coveredLsn);
      break;
    case 'reserve':
      break;
  }
  view.setUint32(0, crc32c(buf.subarray(4)), true);
  return buf;
}

/** The epoch of a record that decodeRecord accepted. */
export function recordEpoch(buf: Uint8Array): number {
  return new DataView(buf.buffer, buf.byteOffset, buf.byteLength).getUint32(12, true);
}

/** What the first 8 bytes of a would-be record say about its length, or undefined if garbage. */
export function peekRecordLength(head: Uint8Array): number | undefined {
  const view = new DataView(head.buffer, head.byteOffset, head.byteLength);
  const length = view.getUint32(4, true);
  if (length < RECORD_HEADER_BYTES || length > RECORD_BYTES_MAX || length % 8 !== 0) return undefined;
  return length;
}

/**
 * Decodes a record expected at `lsn`; undefined if it is not one (torn, corrupt, stale, or
 * the end of the log). Never throws on any bytes.
 */
export function decodeRecord(buf: Uint8Array, lsn: number): LogRecord | undefined {
  if (buf.length < RECORD_HEADER_BYTES) return undefined;
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const length = view.getUint32(4, true);
  if (length !== buf.length) return undefined;
  if (view.getUint32(0, true) !== crc32c(buf.subarray(4))) return undefined;
  if (readU64(view, 16) !== lsn) return undefined;
  const idLimit = readU64(view, 24);
  if (idLimit === undefined) return undefined;
  const type = view.getUint8(8);
  let at = RECORD_HEADER_BYTES;
  const listCount = (max: number, entryBytes: number): number | undefined => {
    if (length < at + RECORD_LIST_PREFIX_BYTES) return undefined;
    const n = view.getUint32(at, true);
    if (n > max || length !== at + RECORD_LIST_PREFIX_BYTES + n * entryBytes) return undefined;
    at += RECORD_LIST_PREFIX_BYTES;
    return n;
  };
  switch (type) {
    case RecordType.begin: {
      const n = listCount(RECORD_RANGES_MAX, RECORD_RANGE_BYTES);
      if (n === undefined) return undefined;
      const ranges: Array<[number, number]> = [];
      for (let i = 0; i < n; i++, at += RECORD_RANGE_BYTES) {
        const first = readU64(view, at);
        const count = readU64(view, at + 8);
        if (first === undefined || count === undefined) return undefined;
        ranges.push([first, count]);
      }
      return { type: 'begin', lsn, idLimit, ranges };
    }
    case RecordType.complete: {
      const n = listCount(RECORD_COMPLETES_MAX, RECORD_COMPLETE_ENTRY_BYTES);
      if (n === undefined) return undefined;
      const begins: number[] = [];
      for (let i = 0; i < n; i++, at += RECORD_COMPLETE_ENTRY_BYTES) {
        const b = readU64(view, at);
        if (b === undefined) return undefined;
        begins.push(b);
      }
      return { type: 'complete', lsn, idLimit, begins };
    }
    case RecordType.checkpoint: {
      if (length !== at + 16) return undefined;
      const checkpointId = readU64(view, at);
      const coveredLsn = readU64(view, at + 8);
      if (checkpointId === undefined || coveredLsn === undefined) return undefined;
      return { type: 'checkpoint', lsn, idLimit, checkpointId, coveredLsn };
    }
    case RecordType.reserve:
      return length === RECORD_HEADER_BYTES ? { type: 'reserve', lsn, idLimit } : undefined;
    default:
      return undefined;
  }
}

export function logCorrupt(message: string): VolrepError {
  return new VolrepError('VOLREP_ERR_LOG_CORRUPT', message);
}
