import assert from 'node:assert/strict';
import { type FileHandle, open } from 'node:fs/promises';

/**
 * The storage the log and bitmap files are written to: a fixed-size file read and written at
 * offsets, made durable by `sync` (fdatasync). One real implementation over node:fs and one
 * simulated disk (sim-disk.ts) that loses and tears unsynced writes on a crash.
 */
export interface BlockFile {
  readonly size: number;
  read(offset: number, length: number): Promise<Uint8Array>;
  write(offset: number, data: Uint8Array): Promise<void>;
  sync(): Promise<void>;
}

/** A BlockFile over a node:fs file handle. */
export class NodeBlockFile implements BlockFile {
  private constructor(
    private readonly handle: FileHandle,
    readonly size: number,
  ) {}

  /** Opens an existing file read-write; its current length is its size. */
  static async open(path: string): Promise<NodeBlockFile> {
    const handle = await open(path, 'r+');
    const { size } = await handle.stat();
    return new NodeBlockFile(handle, size);
  }

  /** Creates (or truncates) a sparse file of `size` bytes. */
  static async create(path: string, size: number): Promise<NodeBlockFile> {
    const handle = await open(path, 'w+');
    await handle.truncate(size);
    return new NodeBlockFile(handle, size);
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    assert.ok(offset >= 0 && length >= 0 && offset + length <= this.size, 'read outside the file');
    const buf = Buffer.alloc(length);
    let done = 0;
    while (done < length) {
      const { bytesRead } = await this.handle.read(buf, done, length - done, offset + done);
      if (bytesRead === 0) break; // beyond the end of a short file: zeroes
      done += bytesRead;
    }
    return buf;
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    assert.ok(offset >= 0 && offset + data.length <= this.size, 'write outside the file');
    let done = 0;
    while (done < data.length) {
      const { bytesWritten } = await this.handle.write(data, done, data.length - done, offset + done);
      done += bytesWritten;
    }
  }

  async sync(): Promise<void> {
    await this.handle.datasync();
  }

  async close(): Promise<void> {
    await this.handle.close();
  }
}
