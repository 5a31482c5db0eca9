/** A megabyte of zeroes: the source of zero writes, and what all-zero checks compare against. */
export const ZEROES = Buffer.alloc(1024 * 1024);

/** Whether every byte is zero (compared a megabyte at a time: memcmp speed). */
export function isAllZero(bytes: Uint8Array): boolean {
  for (let at = 0; at < bytes.length; at += ZEROES.length) {
    const piece = bytes.subarray(at, Math.min(bytes.length, at + ZEROES.length));
    if (Buffer.compare(piece, ZEROES.subarray(0, piece.length)) !== 0) return false;
  }
  return true;
}
