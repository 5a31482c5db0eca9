/**
 * A volume with the replication engine in its write path: the library API (`Volume.open`,
 * `transaction()`), and the BlockDevice the NBD server serves. Every write is a transaction of
 * the engine: its regions are marked and logged durably before the data reaches the volume (I2),
 * and stay dirty until the secondary acks them — or forever, while there is no secondary.
 */
import { WRITE_BYTES_MAX, type WriteKind } from '../core/engine.js';
import {
  type Chunks,
  type DriverWrite,
  ReplicationDriver,
  type UpdateSink,
  type VolumeIo,
} from '../log/driver.js';
import type { BlockDevice, Done } from '../nbd/device.js';
import { VolrepError } from '../util/errors.js';
import { FileDevice } from './file-device.js';
import type { Meta } from './meta.js';
import { VolumeFile } from './volume.js';

/** Regions kept covered by their log record after their writes (DRBD's activity log). */
export const DEFAULT_ACTIVITY_WINDOW_BYTES = 1024 ** 3;
/** Bytes of updates in flight to the secondary before new writes wait (I6). */
export const DEFAULT_INFLIGHT_BYTES = 64 * 1024 ** 2;
export const DEFAULT_ACK_TIMEOUT_MS = 5_000;

export interface VolumeOptions {
  metaDir?: string;
  /** Bytes of recently written regions that need no new log record (default 1 GiB). */
  activityWindowBytes?: number;
  inflightBytesMax?: number;
  ackTimeoutMs?: number;
  /** Where updates go; without one the volume runs standalone and every write stays dirty. */
  sink?: UpdateSink;
}

export interface VolumeStatus {
  dirtyRegions: number;
  dirtyBytes: number;
  pendingUpdates: number;
  pendingBytes: number;
  log: { usedBytes: number; capacityBytes: number; activeTransactions: number };
}

/** Does nothing: no secondary. The engine is never connected, so it sends nothing here. */
const STANDALONE: UpdateSink = {
  send() {},
  sendBarrier() {},
  disconnect() {},
};

export class Volume {
  /** The BlockDevice view, for the NBD server. */
  readonly device: BlockDevice;

  private constructor(
    readonly file: VolumeFile,
    readonly driver: ReplicationDriver,
    private readonly raw: FileDevice,
  ) {
    this.device = new EngineDevice(this, raw);
  }

  /** Opens and locks the volume, recovers its metadata (bitmap + log), and starts the engine. */
  static async open(volumePath: string, opts: VolumeOptions = {}): Promise<Volume> {
    const file = await VolumeFile.open(volumePath, { metaDir: opts.metaDir });
    try {
      if (file.meta.role !== 'primary') {
        // Writing a replica behind its primary's back would diverge it silently.
        throw new VolrepError(
          'VOLREP_ERR_META',
          `${volumePath} is a replica (created with --secondary-of); serve it with --read-only to inspect it`,
        );
      }
      const raw = new FileDevice(file.fd, file.size);
      const { meta } = file;
      const windowBytes = opts.activityWindowBytes ?? DEFAULT_ACTIVITY_WINDOW_BYTES;
      const driver = await ReplicationDriver.open(
        file.metaDir,
        {
          volumeSize: meta.size,
          regionSize: meta.regionSize,
          logFileBytes: meta.logSize,
          activityWindowRegions: Math.max(1, Math.floor(windowBytes / meta.regionSize)),
          inflightBytesMax: opts.inflightBytesMax ?? DEFAULT_INFLIGHT_BYTES,
          ackTimeoutMs: opts.ackTimeoutMs ?? DEFAULT_ACK_TIMEOUT_MS,
        },
        volumeIo(raw),
        opts.sink ?? STANDALONE,
      );
      return new Volume(file, driver, raw);
    } catch (err) {
      await file.close();
      throw err;
    }
  }

  get meta(): Meta {
    return this.file.meta;
  }

  get size(): number {
    return this.file.size;
  }

  get path(): string {
    return this.file.path;
  }

  /** A group of writes that the engine tracks as one transaction. */
  transaction(): Transaction {
    return new Transaction(this);
  }

  /** Reads bytes from the volume (reads do not go through the engine). */
  read(offset: number, length: number): Promise<Buffer> {
    this.checkRange(offset, length);
    const buf = Buffer.allocUnsafe(length);
    return new Promise((resolve, reject) =>
      this.raw.read(offset, length, buf, 0, (err) => (err ? reject(err) : resolve(buf))),
    );
  }

  /** Makes every completed write durable, and is a barrier on the replication stream. */
  flush(): Promise<void> {
    return new Promise((resolve, reject) => this.device.flush((err) => (err ? reject(err) : resolve())));
  }

  status(): VolumeStatus {
    const s = this.driver.engine.stats();
    return {
      dirtyRegions: s.dirtyRegions,
      dirtyBytes: s.dirtyRegions * this.meta.regionSize,
      pendingUpdates: s.pendingUpdates,
      pendingBytes: s.inflightBytes,
      log: {
        usedBytes: s.logHeadLsn - s.logFreedLsn,
        capacityBytes: this.driver.logCapacity,
        activeTransactions: s.activeTransactions,
      },
    };
  }

  /** Dirty regions as [first, last] runs, in order. */
  dirtyRanges(): [number, number][] {
    const runs: [number, number][] = [];
    for (const r of this.driver.engine.indicator.iterate()) {
      const last = runs[runs.length - 1];
      if (last && last[1] === r - 1) last[1] = r;
      else runs.push([r, r]);
    }
    return runs;
  }

  /** Persists the bitmap, flushes the volume, and releases it. */
  async close(): Promise<void> {
    await this.flush().catch(() => {});
    await this.driver.close();
    await this.file.close();
  }

  /** @internal */
  checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new VolrepError('VOLREP_ERR_USAGE', `invalid range ${offset}+${length}`);
    }
    if (offset + length > this.size) {
      throw new VolrepError(
        'VOLREP_ERR_USAGE',
        `range ${offset}+${length} extends beyond the volume (${this.size} bytes)`,
      );
    }
  }
}

/** Writes collected in order and committed as one engine transaction. */
export class Transaction {
  private readonly writes: DriverWrite[] = [];
  private committed = false;

  constructor(private readonly volume: Volume) {}

  write(offset: number, data: Uint8Array): this {
    return this.add(offset, data.length, 'data', data);
  }

  /** @internal A write whose bytes are `chunks` in order (at most WRITE_BYTES_MAX in all). */
  writeChunks(offset: number, chunks: Chunks, length: number): this {
    if (this.committed) throw new VolrepError('VOLREP_ERR_USAGE', 'transaction already committed');
    this.volume.checkRange(offset, length);
    if (length > WRITE_BYTES_MAX) throw new VolrepError('VOLREP_ERR_USAGE', 'write too large for one piece');
    if (length > 0) this.writes.push({ offset, kind: 'data', data: chunks });
    return this;
  }

  zero(offset: number, length: number): this {
    return this.add(offset, length, 'zero');
  }

  trim(offset: number, length: number): this {
    return this.add(offset, length, 'trim');
  }

  /** Resolves when every write is on the volume (not yet durable: call flush() for that). */
  commit(): Promise<void> {
    if (this.committed)
      return Promise.reject(new VolrepError('VOLREP_ERR_USAGE', 'transaction already committed'));
    this.committed = true;
    if (this.writes.length === 0) return Promise.resolve();
    return this.volume.driver.write(this.writes);
  }

  private add(offset: number, length: number, kind: WriteKind, data?: Uint8Array): this {
    if (this.committed) throw new VolrepError('VOLREP_ERR_USAGE', 'transaction already committed');
    this.volume.checkRange(offset, length);
    if (length === 0) return this;
    if (kind === 'data') {
      for (let at = 0; at < length; at += WRITE_BYTES_MAX) {
        const piece = data!.subarray(at, Math.min(length, at + WRITE_BYTES_MAX));
        this.writes.push({ offset: offset + at, kind, data: piece });
      }
    } else {
      for (let at = 0; at < length; at += WRITE_BYTES_MAX) {
        this.writes.push({ offset: offset + at, kind, length: Math.min(WRITE_BYTES_MAX, length - at) });
      }
    }
    return this;
  }
}

/** The NBD server's view: writes go through the engine, reads straight to the file. */
class EngineDevice implements BlockDevice {
  readonly readOnly = false;
  readonly size: number;

  constructor(
    private readonly volume: Volume,
    private readonly raw: FileDevice,
  ) {
    this.size = raw.size;
  }

  read(offset: number, length: number, buf: Buffer, at: number, done: Done): void {
    this.raw.read(offset, length, buf, at, done);
  }

  write(offset: number, data: Buffer[], length: number, fua: boolean, done: Done): void {
    // The payload stays as the socket chunks it arrived in, through the volume write and the send.
    this.run(this.volume.transaction().writeChunks(offset, data, length), fua, done);
  }

  writeZeroes(offset: number, length: number, fua: boolean, done: Done): void {
    this.run(this.volume.transaction().zero(offset, length), fua, done);
  }

  trim(offset: number, length: number, fua: boolean, done: Done): void {
    this.run(this.volume.transaction().trim(offset, length), fua, done);
  }

  flush(done: Done): void {
    this.volume.driver.barrier();
    this.raw.flush(done);
  }

  private run(tx: Transaction, fua: boolean, done: Done): void {
    tx.commit().then(
      () => (fua ? this.raw.flush(done) : done(null)),
      (err: unknown) => done(err instanceof Error ? err : new Error(String(err))),
    );
  }
}

/** The engine's view of the volume: positioned I/O through FileDevice (small requests synchronous). */
function volumeIo(raw: FileDevice): VolumeIo {
  return {
    write(offset, length, kind, data) {
      return new Promise((resolve, reject) => {
        const done: Done = (err) => (err ? reject(err) : resolve());
        if (kind === 'data') {
          const views = data!.map((c) =>
            Buffer.isBuffer(c) ? c : Buffer.from(c.buffer, c.byteOffset, c.byteLength),
          );
          raw.write(offset, views, length, false, done);
        } else {
          raw.writeZeroes(offset, length, false, done);
        }
      });
    },
    read(offset, length) {
      const buf = Buffer.allocUnsafe(length);
      return new Promise((resolve, reject) =>
        raw.read(offset, length, buf, 0, (err) => (err ? reject(err) : resolve(buf))),
      );
    },
    sync() {
      return new Promise((resolve, reject) => raw.flush((err) => (err ? reject(err) : resolve())));
    },
  };
}
