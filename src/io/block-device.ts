/**
 * What the NBD server serves: a fixed-size block device. Callback style on purpose: a backend may
 * complete small requests synchronously (page-cache I/O) and the server then replies in the same
 * turn, with no promise or threadpool hop (PERF-NOTES.md).
 */
export type Done = (err: Error | null) => void;

export interface BlockDevice {
  readonly size: number;
  readonly readOnly: boolean;
  /**
   * write() reads `data` for nothing once it has called done without an error (it keeps no view
   * of it to send on later): the caller may then reuse that memory. Absent means false.
   */
  readonly payloadReusableAfterWrite?: boolean;
  /** Fills `buf[at, at + length)` with the bytes at `offset`. */
  read(offset: number, length: number, buf: Buffer, at: number, done: Done): void;
  /** Writes the concatenation of `data` (total `length` bytes) at `offset`; durable before done if `fua`. */
  write(offset: number, data: Buffer[], length: number, fua: boolean, done: Done): void;
  /** Makes the range read as zeroes. */
  writeZeroes(offset: number, length: number, fua: boolean, done: Done): void;
  /** Discards the range; volrep zeroes it so that volume and replica stay byte-identical. */
  trim(offset: number, length: number, fua: boolean, done: Done): void;
  /** Makes every completed write durable. */
  flush(done: Done): void;
}
