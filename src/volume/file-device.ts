import fs from 'node:fs';
import type { BlockDevice, Done } from '../io/block-device.js';

/**
 * Requests up to this size run synchronously on the event loop: a positioned read or write of a
 * few KiB into the page cache costs microseconds, less than the threadpool hop (PERF-NOTES.md).
 * Larger transfers and every sync go through the threadpool so the loop never stalls for long.
 */
export const SYNC_IO_BYTES_MAX = 64 * 1024;
const ZERO_CHUNK = Buffer.alloc(1024 * 1024);

/** A BlockDevice over an open file descriptor, with positioned I/O. */
export class FileDevice implements BlockDevice {
  constructor(
    private readonly fd: number,
    readonly size: number,
    readonly readOnly = false,
  ) {}

  read(offset: number, length: number, buf: Buffer, at: number, done: Done): void {
    if (length <= SYNC_IO_BYTES_MAX) {
      let got = 0;
      try {
        while (got < length) {
          const n = fs.readSync(this.fd, buf, at + got, length - got, offset + got);
          if (n === 0) throw new Error('short read: volume is smaller than its metadata says');
          got += n;
        }
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

  write(offset: number, data: Buffer[], length: number, fua: boolean, done: Done): void {
    const finish = fua ? (err: Error | null) => (err ? done(err) : this.flush(done)) : done;
    if (length <= SYNC_IO_BYTES_MAX) {
      try {
        writevAllSync(this.fd, data, offset);
      } catch (err) {
        done(err as Error);
        return;
      }
      finish(null);
      return;
    }
    writevAll(this.fd, data, offset, finish);
  }

  writeZeroes(offset: number, length: number, fua: boolean, done: Done): void {
    const finish = fua ? (err: Error | null) => (err ? done(err) : this.flush(done)) : done;
    if (length <= SYNC_IO_BYTES_MAX) {
      try {
        writevAllSync(this.fd, [ZERO_CHUNK.subarray(0, length)], offset);
      } catch (err) {
        done(err as Error);
        return;
      }
      finish(null);
      return;
    }
    const step = (at: number): void => {
      if (at === offset + length) return finish(null);
      const n = Math.min(ZERO_CHUNK.length, offset + length - at);
      writevAll(this.fd, [ZERO_CHUNK.subarray(0, n)], at, (err) => (err ? finish(err) : step(at + n)));
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
