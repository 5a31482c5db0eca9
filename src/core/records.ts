/**
 * The log records the engine asks for, as plain data, and their exact encoded sizes. The byte
 * layout lives in src/log/format.ts; the sizes live here because the engine assigns every
 * record its log position (lsn: a byte offset in the endless log stream that only grows) and
 * decides when the fixed-size circular log is full.
 */

/** Bytes of every record header: crc32c, length, type, lsn, id limit. */
export const RECORD_HEADER_BYTES = 32;
/** Bytes of one region range (start, count) in a begin record. */
export const RECORD_RANGE_BYTES = 16;
/** Bytes of one begin-record lsn in a completion record. */
export const RECORD_COMPLETE_ENTRY_BYTES = 8;
/** Fixed payload before the variable part (entry count + padding). */
export const RECORD_LIST_PREFIX_BYTES = 8;
/** Payload of a checkpoint record: checkpoint id, covered lsn. */
export const RECORD_CHECKPOINT_PAYLOAD_BYTES = 16;
/** Ranges per begin record; a transaction has at most this many writes. */
export const RECORD_RANGES_MAX = 256;
/** Begin-record lsns per completion record. */
export const RECORD_COMPLETES_MAX = 256;

export const RecordType = {
  begin: 1,
  complete: 2,
  checkpoint: 3,
  reserve: 4,
} as const;

interface RecordBase {
  /** Position of the record in the log stream; the first byte of its header. */
  lsn: number;
  /** Update-id high-water mark: every update id ever issued is below it (H14). */
  idLimit: number;
}

/** A transaction's locations: the log must hold this durably before the volume is written. */
export interface BeginRecord extends RecordBase {
  type: 'begin';
  /** Region ranges [first region, region count], sorted, not overlapping. */
  ranges: Array<[number, number]>;
}

/** Hint that the listed begin records no longer cover anything (H4: may be lost). */
export interface CompleteRecord extends RecordBase {
  type: 'complete';
  begins: number[];
}

/** Hint that a bitmap covering every record below `coveredLsn` was persisted. */
export interface CheckpointRecord extends RecordBase {
  type: 'checkpoint';
  checkpointId: number;
  coveredLsn: number;
}

/** Raises the durable update-id high-water mark when no other record is due. */
export interface ReserveRecord extends RecordBase {
  type: 'reserve';
}

export type LogRecord = BeginRecord | CompleteRecord | CheckpointRecord | ReserveRecord;

export function beginRecordBytes(rangeCount: number): number {
  return RECORD_HEADER_BYTES + RECORD_LIST_PREFIX_BYTES + rangeCount * RECORD_RANGE_BYTES;
}

export function completeRecordBytes(count: number): number {
  return RECORD_HEADER_BYTES + RECORD_LIST_PREFIX_BYTES + count * RECORD_COMPLETE_ENTRY_BYTES;
}

export const CHECKPOINT_RECORD_BYTES = RECORD_HEADER_BYTES + RECORD_CHECKPOINT_PAYLOAD_BYTES;
export const RESERVE_RECORD_BYTES = RECORD_HEADER_BYTES;

/** Encoded size of a record, in bytes (always a multiple of 8). */
export function recordBytes(record: LogRecord): number {
  switch (record.type) {
    case 'begin':
      return beginRecordBytes(record.ranges.length);
    case 'complete':
      return completeRecordBytes(record.begins.length);
    case 'checkpoint':
      return CHECKPOINT_RECORD_BYTES;
    case 'reserve':
      return RESERVE_RECORD_BYTES;
  }
}
