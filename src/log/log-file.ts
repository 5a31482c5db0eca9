/**
 * The transaction log: a fixed-size circular file of checksummed records (format.ts).
 *
 * The engine decides what to append and where (it assigns lsns); this class lays the records
 * out, writes them with group commit (everything appended while a sync is in flight goes out in
 * the next single write + fdatasync), moves the tail when the engine frees space, and scans the
 * log on recovery.
 *
 * Tail moves are durable before the space is reused: a batch that follows a tail move first
 * writes and syncs the header, then writes and syncs the records. Otherwise a crash could leave
 * the header pointing at overwritten bytes and the scan would miss live records.
 */
import assert from 'node:assert/strict';
import { type LogRecord, RECORD_HEADER_BYTES, recordBytes } from '../core/records.js';
import { VolrepError } from '../errors.js';
import type { BlockFile } from '../io/block-file.js';
import {
  decodeHeader,
  decodeRecord,
  encodeHeader,
  encodeRecord,
  LOG_DATA_OFFSET,
  LOG_FORMAT_VERSION,
  LOG_HEADER_SLOT_BYTES,
  LOG_HEADER_SLOTS,
  type LogHeader,
  logCorrupt,
  peekRecordLength,
  recordEpoch,
} from './format.js';

/** The smallest record area (the engine's configuration may demand more). */
export const LOG_CAPACITY_BYTES_MIN = 1024;

/** How the scan ended: at bytes that are not a record ('clean'), or at a damaged record. */
export type ScanEnd = 'clean' | 'torn';

export interface LogScan {
  tailLsn: number;
  headLsn: number;
  records: LogRecord[];
  end: ScanEnd;
  /** The highest id limit in the header and the records (H14). */
  idLimit: number;
}

/** A batch written but not yet synced (see writeBatch / syncBatch). */
export interface LogBatch {
  throughLsn: number;
}

export class LogFile {
  readonly capacity: number;
  private epoch: number;
  private headerSeq: number;
  private durableTail: number;
  private pendingTail: number;
  private idLimit: number;
  /** Records appended and not yet written, in lsn order. */
  private pending: Uint8Array[] = [];
  private pendingBytes = 0;
  private written: number;
  private durable: number;
  private head: number;
  private writing = false;

  private constructor(
    private readonly file: BlockFile,
    header: LogHeader,
    headLsn: number,
  ) {
    this.capacity = header.capacity;
    this.epoch = header.epoch;
    this.headerSeq = header.seq;
    this.durableTail = header.tailLsn;
    this.pendingTail = header.tailLsn;
    this.idLimit = header.idLimit;
    this.head = headLsn;
    this.written = headLsn;
    this.durable = headLsn;
  }

  /** Reads the log without changing it (status tools): header and records from the tail. */
  static async inspect(file: BlockFile): Promise<LogScan> {
    const header = await readHeader(file);
    return scanRecords(file, header);
  }

  /** Bytes of a log file whose record area holds `capacity` bytes. */
  static fileBytes(capacity: number): number {
    return LOG_DATA_OFFSET + capacity;
  }

  /** Writes an empty log (tail = head = 0) over the whole file. */
  static async format(file: BlockFile, idLimit = 1): Promise<void> {
    const capacity = file.size - LOG_DATA_OFFSET;
    if (capacity < LOG_CAPACITY_BYTES_MIN || capacity % 8 !== 0) {
      throw new VolrepError(
        'VOLREP_ERR_LOG_SIZE',
        `log file of ${file.size} bytes: needs ${LOG_DATA_OFFSET} header bytes plus a multiple of 8, at least ${LOG_CAPACITY_BYTES_MIN}`,
      );
    }
    // Header sequence s lives in slot s % 2; the first rewrite goes to the other slot.
    const header = encodeHeader({
      version: LOG_FORMAT_VERSION,
      epoch: 0,
      seq: 0,
      capacity,
      tailLsn: 0,
      idLimit,
    });
    await file.write(0, header);
    // The other slot and the first record position must not hold an older log's bytes.
    await file.write(LOG_HEADER_SLOT_BYTES, new Uint8Array(LOG_HEADER_SLOT_BYTES));
    await file.write(LOG_DATA_OFFSET, new Uint8Array(RECORD_HEADER_BYTES));
    await file.sync();
  }

  /**
   * Reads the header and scans the records from the tail; the log continues after them, in a
   * new epoch made durable before this returns.
   */
  static async open(file: BlockFile): Promise<{ log: LogFile; scan: LogScan }> {
    if (file.size < LOG_DATA_OFFSET) {
      throw new VolrepError(
        'VOLREP_ERR_LOG_SIZE',
        `log file has ${file.size} bytes, less than its ${LOG_DATA_OFFSET}-byte header: not a volrep log or truncated`,
      );
    }
    // After a process kill the newest header (a tail move) may be only in the page cache. The new
    // epoch's header goes to the other slot, over the newest durable one: first make what we read
    // durable, or a power loss could leave no header that knows this epoch's records.
    await file.sync();
    const header = await readHeader(file);
    if (header.capacity !== file.size - LOG_DATA_OFFSET) {
      throw new VolrepError(
        'VOLREP_ERR_LOG_SIZE',
        `log file has ${file.size} bytes but its header says ${LogFile.fileBytes(header.capacity)}: truncated or resized`,
      );
    }
    const scan = await scanRecords(file, header);
    const log = new LogFile(file, header, scan.headLsn);
    log.idLimit = Math.max(log.idLimit, scan.idLimit);
    log.epoch += 1;
    await log.writeHeader();
    return { log, scan };
  }

  get headLsn(): number {
    return this.head;
  }

  get durableLsn(): number {
    return this.durable;
  }

  get tailLsn(): number {
    return this.pendingTail;
  }

  /**
   * Empties the log and continues at `lsn` (beyond the scanned head), durably. Recovery uses it
   * when the persisted bitmap covers records that the crash lost: new records must land at or
   * after the bitmap's covered position, and the scan must find them from the tail.
   */
  async restartAt(lsn: number): Promise<void> {
    assert.ok(lsn >= this.head && this.pending.length === 0);
    this.head = lsn;
    this.written = lsn;
    this.durable = lsn;
    this.pendingTail = lsn;
    await this.writeBatch();
  }

  /** Adds a record to the next batch; its lsn must be the head. */
  append(record: LogRecord): void {
    assert.equal(record.lsn, this.head, 'records are appended at the head');
    const bytes = encodeRecord(record, this.epoch);
    assert.equal(bytes.length, recordBytes(record));
    assert.ok(
      this.head + bytes.length - this.pendingTail <= this.capacity,
      'log overrun: the engine checks space',
    );
    this.pending.push(bytes);
    this.pendingBytes += bytes.length;
    this.head += bytes.length;
    this.idLimit = Math.max(this.idLimit, record.idLimit);
  }

  /** Frees records before `lsn`; durable with the next batch, before any byte reuses them. */
  setTail(lsn: number, idLimit: number): void {
    assert.ok(lsn >= this.pendingTail && lsn <= this.head, 'tail moves forward, up to the head');
    this.pendingTail = lsn;
    this.idLimit = Math.max(this.idLimit, idLimit);
  }

  /** Group commit: writes everything appended so far, then syncs. Returns the durable lsn. */
  async flush(): Promise<number> {
    const batch = await this.writeBatch();
    return this.syncBatch(batch);
  }

  /**
   * First half of a flush: writes the header if the tail moved (and syncs it), then every
   * record pending when it was called in one write (two if it wraps). Not durable until
   * syncBatch. The records and the tail are taken at the call: a record appended while the
   * header is being written may lie in space freed by a later tail move that this header does
   * not carry, so it waits for the next batch (defect: it used to join this one and overrun).
   */
  async writeBatch(): Promise<LogBatch> {
    assert.ok(!this.writing, 'one batch at a time');
    this.writing = true;
    try {
      const start = this.written;
      const bytes = concat(this.pending, this.pendingBytes);
      this.pending = [];
      this.pendingBytes = 0;
      const tail = this.pendingTail;
      if (tail !== this.durableTail) await this.writeHeader(tail);
      assert.ok(start + bytes.length - this.durableTail <= this.capacity, 'batch overwrites live records');
      await this.writeRing(start, bytes);
      this.written = start + bytes.length;
      return { throughLsn: this.written };
    } finally {
      this.writing = false;
    }
  }

  /** Second half of a flush: fdatasync; everything up to batch.throughLsn is durable. */
  async syncBatch(batch: LogBatch): Promise<number> {
    await this.file.sync();
    this.durable = Math.max(this.durable, batch.throughLsn);
    return this.durable;
  }

  /** Writes the header (tail, epoch, id limit) to the other slot and syncs it. */
  private async writeHeader(tail = this.pendingTail): Promise<void> {
    const seq = this.headerSeq + 1;
    const header = encodeHeader({
      version: LOG_FORMAT_VERSION,
      epoch: this.epoch,
      seq,
      capacity: this.capacity,
      tailLsn: tail,
      idLimit: this.idLimit,
    });
    await this.file.write((seq % LOG_HEADER_SLOTS) * LOG_HEADER_SLOT_BYTES, header);
    await this.file.sync();
    this.headerSeq = seq;
    this.durableTail = tail;
  }

  private async writeRing(lsn: number, bytes: Uint8Array): Promise<void> {
    if (bytes.length === 0) return;
    const at = lsn % this.capacity;
    const first = Math.min(bytes.length, this.capacity - at);
    await this.file.write(LOG_DATA_OFFSET + at, bytes.subarray(0, first));
    if (first < bytes.length) await this.file.write(LOG_DATA_OFFSET, bytes.subarray(first));
  }
}

/** The valid header slot with the highest sequence; refuses a newer format or no valid slot. */
async function readHeader(file: BlockFile): Promise<LogHeader> {
  let best: LogHeader | undefined;
  const why: string[] = [];
  for (let slot = 0; slot < LOG_HEADER_SLOTS; slot++) {
    const d = decodeHeader(await file.read(slot * LOG_HEADER_SLOT_BYTES, LOG_HEADER_SLOT_BYTES));
    if (d.kind === 'newer') {
      throw new VolrepError(
        'VOLREP_ERR_LOG_VERSION',
        `log format version ${d.version} is newer than this volrep supports (${LOG_FORMAT_VERSION}): upgrade volrep`,
      );
    }
    if (d.kind === 'invalid') why.push(`slot ${slot}: ${d.why}`);
    else if (best === undefined || d.header.seq > best.seq) best = d.header;
  }
  if (best === undefined) throw logCorrupt(`log file has no valid header (${why.join(', ')})`);
  return best;
}

/** Bytes of the record area a scan reads at a time: what recovery holds, whatever the log's size. */
export const SCAN_WINDOW_BYTES = 1 << 20;

/**
 * Walks the records from the tail; the first position that does not hold a valid record with
 * the expected lsn is the end (a torn or corrupt record is the end too). Reads the record area
 * in order, a window at a time, up to the end: the cost grows with what the log holds.
 */
async function scanRecords(file: BlockFile, header: LogHeader): Promise<LogScan> {
  const capacity = header.capacity;
  let windowLsn = header.tailLsn;
  let window: Uint8Array = new Uint8Array(0);
  /** The record area's bytes from `lsn`, through the window (read again from `lsn` when past it). */
  const readRing = async (lsn: number, length: number): Promise<Uint8Array> => {
    if (lsn < windowLsn || lsn + length > windowLsn + window.length) {
      const size = Math.min(capacity, Math.max(SCAN_WINDOW_BYTES, length));
      const at = lsn % capacity;
      const first = await file.read(LOG_DATA_OFFSET + at, Math.min(size, capacity - at));
      window =
        first.length === size
          ? first
          : concat([first, await file.read(LOG_DATA_OFFSET, size - first.length)], size);
      windowLsn = lsn;
    }
    return window.subarray(lsn - windowLsn, lsn - windowLsn + length);
  };
  const records: LogRecord[] = [];
  let lsn = header.tailLsn;
  let idLimit = header.idLimit;
  let end: ScanEnd = 'clean';
  let epoch = 0;
  while (lsn - header.tailLsn + RECORD_HEADER_BYTES <= capacity) {
    const head = await readRing(lsn, RECORD_HEADER_BYTES);
    const view = new DataView(head.buffer, head.byteOffset, head.byteLength);
    const length = peekRecordLength(head);
    // Bytes that name this lsn and a plausible length were meant as this record: torn.
    const claimsHere = length !== undefined && view.getBigUint64(16, true) === BigInt(lsn);
    const bytes =
      length !== undefined && lsn - header.tailLsn + length <= capacity
        ? await readRing(lsn, length)
        : undefined;
    let record = bytes && decodeRecord(bytes, lsn);
    if (record !== undefined) {
      // A leftover of an earlier boot behind this boot's records is not part of the log.
      const e = recordEpoch(bytes!);
      if (e < epoch || e > header.epoch) record = undefined;
      else epoch = e;
    }
    if (record === undefined) {
      if (claimsHere) end = 'torn';
      break;
    }
    records.push(record);
    idLimit = Math.max(idLimit, record.idLimit);
    lsn += length!;
  }
  return { tailLsn: header.tailLsn, headLsn: lsn, records, end, idLimit };
}

function concat(parts: Uint8Array[], total: number): Uint8Array {
  const out = new Uint8Array(total);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}
