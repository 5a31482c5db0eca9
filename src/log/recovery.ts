/**
 * Crash recovery (DESIGN.md §2, last paragraph): load the persisted bitmap, scan the log, and
 * mark dirty every location of every transaction that has no completion record and is not
 * older than the bitmap's covered position. The cost grows with the log's length (one read of
 * the record area) plus one read of the bitmap, never with a scan of the volume.
 */
import type { RecoveredState } from '../core/engine.js';
import { IndicatorMap } from '../core/indicator-map.js';
import { VolrepError } from '../errors.js';
import type { BlockFile } from '../io/block-file.js';
import { BitmapFile } from './bitmap-file.js';
import { LogFile, type ScanEnd } from './log-file.js';

export interface RecoveryReport {
  /** Regions dirty in the persisted bitmap. */
  bitmapDirty: number;
  /** Regions dirty after adding the incomplete transactions. */
  dirty: number;
  records: number;
  incompleteTransactions: number;
  scanEnd: ScanEnd;
  /** The log was restarted at the bitmap's covered position (the crash lost records it covers). */
  restarted: boolean;
}

export interface Recovered {
  state: RecoveredState;
  log: LogFile;
  bitmap: BitmapFile;
  report: RecoveryReport;
}

export async function recover(
  logFile: BlockFile,
  bitmapFile: BlockFile,
  regionCount: number,
): Promise<Recovered> {
  const { file: bitmap, bitmap: persisted } = await BitmapFile.open(bitmapFile, regionCount);
  const { log, scan } = await LogFile.open(logFile);
  // The bits just read become the map (no second copy of one bit per region).
  const dirty = IndicatorMap.adopt(regionCount, persisted.bits);
  const bitmapDirty = dirty.count;

  // Begin records the bitmap does not cover, minus those with a completion record (a hint, H4:
  // a lost one only makes recovery mark more).
  const live = new Map<number, Array<[number, number]>>();
  let idLimit = Math.max(persisted.idLimit, scan.idLimit);
  for (const record of scan.records) {
    idLimit = Math.max(idLimit, record.idLimit);
    if (record.type === 'begin' && record.lsn >= persisted.coveredLsn) live.set(record.lsn, record.ranges);
    else if (record.type === 'complete') for (const b of record.begins) live.delete(b);
  }
  for (const ranges of live.values()) {
    for (const [first, count] of ranges) {
      if (first + count > regionCount) {
        throw new VolrepError(
          'VOLREP_ERR_LOG_CORRUPT',
          `log record names regions ${first}..${first + count - 1} but the volume has ${regionCount}`,
        );
      }
      for (let r = first; r < first + count; r++) dirty.set(r);
    }
  }

  // New records must go at or after the bitmap's covered position, or the next recovery would
  // ignore them; if the crash lost records up to there, restart the (covered) log there.
  let restarted = false;
  if (scan.headLsn < persisted.coveredLsn) {
    await log.restartAt(persisted.coveredLsn);
    restarted = true;
  }
  return {
    state: { dirty: dirty.view(), idLimit, logTailLsn: log.tailLsn, logHeadLsn: log.headLsn },
    log,
    bitmap,
    report: {
      bitmapDirty,
      dirty: dirty.count,
      records: scan.records.length,
      incompleteTransactions: live.size,
      scanEnd: scan.end,
      restarted,
    },
  };
}
