import { VolrepError } from '../errors.js';

const UNITS: Record<string, number> = {
  '': 1,
  K: 1024,
  M: 1024 ** 2,
  G: 1024 ** 3,
  T: 1024 ** 4,
};

const SIZE_PATTERN = /^(\d+)([KMGT]?)(?:i?B)?$/i;

/**
 * Parses a size such as `4096`, `64K`, `256M`, `1G`, `1T` (powers of 1024; `KiB`/`KB` accepted too).
 * Refuses anything that is not a whole, safe integer number of bytes.
 */
export function parseSize(text: string, what = 'size'): number {
  const match = SIZE_PATTERN.exec(text.trim());
  if (!match) {
    throw new VolrepError(
      'VOLREP_ERR_SIZE',
      `invalid ${what} '${text}': expected a number of bytes with an optional K, M, G or T suffix (e.g. 64K, 1G)`,
    );
  }
  const value = Number(match[1]) * UNITS[match[2].toUpperCase()];
  if (!Number.isSafeInteger(value)) {
    throw new VolrepError('VOLREP_ERR_SIZE', `invalid ${what} '${text}': too large`);
  }
  return value;
}

/** Formats a byte count in the largest unit that divides it exactly, so parseSize(formatSize(n)) === n. */
export function formatSize(bytes: number): string {
  for (const unit of ['T', 'G', 'M', 'K']) {
    const factor = UNITS[unit];
    if (bytes >= factor && bytes % factor === 0) return `${bytes / factor}${unit}`;
  }
  return String(bytes);
}

const DURATION_PATTERN = /^(\d+(?:\.\d+)?)(ms|s|m)?$/;

/** Parses a duration such as `5s`, `250ms`, `1m` or a bare number of seconds, into milliseconds. */
export function parseDuration(text: string, what = 'duration'): number {
  const match = DURATION_PATTERN.exec(text.trim());
  if (!match) {
    throw new VolrepError('VOLREP_ERR_USAGE', `invalid ${what} '${text}': expected e.g. 5s, 250ms or 1m`);
  }
  const value = Number(match[1]);
  const unit = match[2] ?? 's';
  return Math.round(unit === 'ms' ? value : unit === 's' ? value * 1000 : value * 60_000);
}

export function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0 && n <= 2 ** 30;
}
