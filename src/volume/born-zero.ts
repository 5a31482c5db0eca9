/**
 * A volume file `volrep create` made itself holds only zeros, and while nothing but volrep
 * writes to it, every region written since is dirty on the primary (no replica acked it). The
 * pair's first sync then sends only those regions: a fresh sparse 1 TiB pair is in sync in
 * moments, not in the hours it takes to send a terabyte of zeros.
 *
 * Trusted only while the file is provably untouched since: the same inode, the same size and
 * change time (any write, truncate or fallocate moves ctime) and no allocated block. The primary
 * checks at its start (after that its own writes move ctime), the secondary at its first welcome
 * (it writes nothing to the replica before). A file written outside volrep before then (say, an
 * image copied in) fails the check, and the pair syncs in full.
 */
import { fstatSync, statSync } from 'node:fs';

/** What `volrep create` recorded about the volume file it made (decimal strings: 64-bit values). */
export interface BornZeroMark {
  ino: string;
  ctimeNs: string;
  size: number;
}

export function parseBornZeroMark(v: unknown): BornZeroMark | undefined {
  if (typeof v !== 'object' || v === null) return undefined;
  const m = v as Record<string, unknown>;
  const decimal = (x: unknown): x is string => typeof x === 'string' && /^[0-9]{1,20}$/.test(x);
  if (!decimal(m.ino) || !decimal(m.ctimeNs)) return undefined;
  if (typeof m.size !== 'number' || !Number.isSafeInteger(m.size) || m.size <= 0) return undefined;
  return { ino: m.ino, ctimeNs: m.ctimeNs, size: m.size };
}

/** The mark of a volume file just created (sparse, synced). */
export function takeBornZeroMark(volumePath: string): BornZeroMark {
  const st = statSync(volumePath, { bigint: true });
  return { ino: String(st.ino), ctimeNs: String(st.ctimeNs), size: Number(st.size) };
}

/**
 * Whether the volume file (a path, or the descriptor a daemon writes through) is still exactly as
 * `volrep create` left it (all zeros).
 */
export function stillBornZero(volume: string | number, mark: BornZeroMark): boolean {
  try {
    const st =
      typeof volume === 'number' ? fstatSync(volume, { bigint: true }) : statSync(volume, { bigint: true });
    return (
      st.isFile() &&
      String(st.ino) === mark.ino &&
      String(st.ctimeNs) === mark.ctimeNs &&
      Number(st.size) === mark.size &&
      st.blocks === 0n
    );
  } catch {
    return false;
  }
}
