/**
 * What the NBD server serves: a fixed-size block device. Callback style on purpose: a backend may
 * complete small requests synchronously (page-cache I/O) and the server then replies in the same
 * turn, with no promise or threadpool hop (PERF-NOTES.md).
 */
export type Done = (err: Error | null) => void;

/**
 * A write's data is read no more: its memory may be reused (`true`), or some I/O may still read
 * it (`false`, after a failure: never reuse it).
 */
export type Released = (reusable: boolean) => void;

export interface BlockDevice {
  readonly size: number;
  readonly readOnly: boolean;
  /**
   * write() calls its `released` exactly once, when it reads `data` no more: for a file once it
   * is written (before done, and before a FUA's flush), for a replicating primary once it is sent
   * on too (often after done). The caller may then reuse that memory. Absent means false:
   * `released` is never called.
   */
  readonly reportsRelease?: boolean;
  /** Fills `buf[at, at + length)` with the bytes at `offset`. */
  read(offset: number, length: number, buf: Buffer, at: number, done: Done): void;
  /**
   * Writes the concatenation of `data` (total `length` bytes) at `offset`; durable before done if
   * `fua`. `released` may be called from anywhere, within this call too: only bookkeeping there.
   */
  write(offset: number, data: Buffer[], length: number, fua: boolean, done: Done, released?: Released): void;
  /** Makes the range read as zeroes. */
  writeZeroes(offset: number, length: number, fua: boolean, done: Done): void;
  /** Discards the range; volrep zeroes it so that volume and replica stay byte-identical. */
  trim(offset: number, length: number, fua: boolean, done: Done): void;
  /** Makes every completed write durable. */
  flush(done: Done): void;
}
