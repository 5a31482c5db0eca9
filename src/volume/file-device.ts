import fs from 'node:fs';
import type { BlockDevice, Done, Released } from '../io/block-device.js';
import { isAllZero, ZEROES } from '../util/zero.js';

/**
 * Requests up to this size run synchronously on the event loop: a positioned read or write of a
 * few KiB into the page cache costs microseconds, less than the threadpool hop (PERF-NOTES.md).
 * Larger transfers and every sync go through the threadpool so the loop never stalls for long.
 */
export const SYNC_IO_BYTES_MAX = 64 * 1024;

/** A BlockDevice over an open file descriptor, with positioned I/O. */
export class FileDevice implements BlockDevice {
  readonly reportsRelease = true;
  /** For the synchronous zero check of small ranges (one at a time: the event loop is single). */
  private readonly scratch = Buffer.allocUnsafe(SYNC_IO_BYTES_MAX);

  constructor(
    private readonly fd: number,
    readonly size: number,
    readonly readOnly = false,
    /** Writes up to this size run on the event loop (reads always up to SYNC_IO_BYTES_MAX). */
    private readonly syncWriteBytesMax = SYNC_IO_BYTES_MAX,
  ) {}

  read(offset: number, length: number, buf: Buffer, at: number, done: Done): void {
    if (length <= SYNC_IO_BYTES_MAX) {
      try {
        readAllSync(this.fd, buf.subarray(at, at + length), offset);
      } catch (err) {
        done(err as Error);
        return;
      }
      done(null);
      return;
    }
    const step = (got: number): void => {
      if (got === length) return done(null);
      fs.read(this.fd, buf, at + got, length - got, offset + got, (err, n) => {
        if (err) return done(err);
        if (n === 0) return done(new Error('short read: volume is smaller than its metadata says'));
        step(got + n);
      });
    };
    step(0);
  }

  write(offset: number, data: Buffer[], length: number, fua: boolean, done: Done, released?: Released): void {
    // The data is read no more once it is written (a FUA's flush comes after).
    const written = (err: Error | null) => {
      released?.(err === null);
      if (err) done(err);
      else if (fua) this.flush(done);
      else done(null);
    };
    if (length <= this.syncWriteBytesMax) {
      try {
        writevAllSync(this.fd, data, offset);
      } catch (err) {
        written(err as Error);
        return;
      }
      written(null);
      return;
    }
    writevAll(this.fd, data, offset, written);
  }

  /**
   * Zeroes a range, writing only the pieces that do not read back as zeroes already: a hole of a
   * sparse file stays a hole (a replica's initial full sync of a fresh, sparse volume allocates
   * nothing), and reading a piece costs less than writing it.
   */
  writeZeroes(offset: number, length: number, fua: boolean, done: Done): void {
    const finish = fua ? (err: Error | null) => (err ? done(err) : this.flush(done)) : done;
    if (length <= SYNC_IO_BYTES_MAX) {
      try {
        const piece = this.scratch.subarray(0, length);
        readAllSync(this.fd, piece, offset);
        if (!isAllZero(piece)) writevAllSync(this.fd, [ZEROES.subarray(0, length)], offset);
      } catch (err) {
        done(err as Error);
        return;
      }
      finish(null);
      return;
    }
    // One buffer for the whole request, reused piece by piece (large TRIMs are many pieces).
    const buf = Buffer.allocUnsafe(Math.min(ZEROES.length, length));
    const step = (at: number): void => {
      if (at === offset + length) return finish(null);
      const n = Math.min(ZEROES.length, offset + length - at);
      const piece = buf.subarray(0, n);
      this.read(at, n, piece, 0, (err) => {
        if (err) return finish(err);
        if (isAllZero(piece)) return step(at + n);
        writevAll(this.fd, [ZEROES.subarray(0, n)], at, (err) => (err ? finish(err) : step(at + n)));
      });
    };
    step(offset);
  }

  trim(offset: number, length: number, fua: boolean, done: Done): void {
    this.writeZeroes(offset, length, fua, done);
  }

  flush(done: Done): void {
    fs.fdatasync(this.fd, (err) => done(err));
  }
}

/** Fills `buf` from `position` (a short read means the volume is smaller than its metadata says). */
function readAllSync(fd: number, buf: Buffer, position: number): void {
  let got = 0;
  while (got < buf.length) {
    const n = fs.readSync(fd, buf, got, buf.length - got, position + got);
    if (n === 0) throw new Error('short read: volume is smaller than its metadata says');
    got += n;
  }
}

/** Drops the first `n` bytes of a buffer list (after a short write). */
function dropFront(buffers: Buffer[], n: number): Buffer[] {
  let left = n;
  let i = 0;
  while (i < buffers.length && left >= buffers[i].length) {
    left -= buffers[i].length;
    i++;
  }
  const rest = buffers.slice(i);
  if (left > 0) rest[0] = rest[0].subarray(left);
  return rest;
}

function totalLength(buffers: Buffer[]): number {
  let n = 0;
  for (const b of buffers) n += b.length;
  return n;
}

/** IOV_MAX on Linux: writev takes at most this many buffers per call. */
const IOV_MAX = 1024;

export function writevAllSync(fd: number, buffers: Buffer[], position: number): void {
  let rest = buffers;
  let at = position;
  while (rest.length > 0) {
    const batch = rest.length > IOV_MAX ? rest.slice(0, IOV_MAX) : rest;
    const n = fs.writevSync(fd, batch, at);
    at += n;
    rest = dropFront(rest, n);
  }
}

export function writevAll(fd: number, buffers: Buffer[], position: number, done: Done): void {
  if (buffers.length === 0 || totalLength(buffers) === 0) return done(null);
  const batch = buffers.length > IOV_MAX ? buffers.slice(0, IOV_MAX) : buffers;
  fs.writev(fd, batch, position, (err, n) => {
    if (err) return done(err);
    const rest = dropFront(buffers, n);
    if (rest.length === 0) return done(null);
    writevAll(fd, rest, position + n, done);
  });
}
