/**
 * A volume with the replication engine in its write path: the library API (`Volume.open`,
 * `transaction()`), and the BlockDevice the NBD server serves. Every write is a transaction of
 * the engine: its regions are marked and logged durably before the data reaches the volume (I2),
 * and stay dirty until the secondary acks them — or forever, while there is no secondary.
 */
import { type TransactionOptions, WRITE_BYTES_MAX, type WriteKind } from '../core/engine.js';
import { VolrepError } from '../errors.js';
import type { BlockDevice, Done, Released } from '../io/block-device.js';
import type { NodeBlockFile } from '../io/block-file.js';
import { systemClock } from '../io/clock.js';
import type { RecoveryReport } from '../log/recovery.js';
import {
  type NodeLogger,
  type NodeWrite,
  type PrimaryLinkConfig,
  PrimaryNode,
  type PrimaryNodeStatus,
} from '../shell/primary-node.js';
import { stillBornZero } from './born-zero.js';
import { FileDevice } from './file-device.js';
import type { Meta } from './meta.js';
import {
  BITMAP_FILE,
  LOG_FILE,
  openMetadataFile,
  PAIR_STATE_FILE,
  VolumeFile,
  withMetaDirName,
} from './volume.js';

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
  /** Complete a write only once the secondary acked it (while connected). */
  syncMode?: boolean;
  /** Replicate to this secondary; without it the volume runs standalone and every write stays dirty. */
  link?: Omit<PrimaryLinkConfig, 'hello'>;
  logger?: NodeLogger;
  /** The engine stopped after an I/O failure. */
  onFailure?: (err: Error) => void;
}

export interface VolumeStatus {
  dirtyRegions: number;
  dirtyBytes: number;
  pendingUpdates: number;
  pendingBytes: number;
  log: { usedBytes: number; capacityBytes: number; activeTransactions: number };
}

const SILENT: NodeLogger = { debug() {}, info() {}, warn() {}, error() {} };

export class Volume {
  /** The BlockDevice view, for the NBD server. */
  readonly device: BlockDevice;

  private constructor(
    readonly file: VolumeFile,
    readonly node: PrimaryNode,
    private readonly raw: FileDevice,
    private readonly metaFiles: NodeBlockFile[],
  ) {
    this.device = new EngineDevice(this, raw);
  }

  /**
   * Opens and locks the volume, recovers its metadata (bitmap + log), and starts the engine.
   * Every metadata file must be there and readable: a missing one is refused, never read as
   * "nothing dirty" (H18).
   */
  static async open(volumePath: string, opts: VolumeOptions = {}): Promise<Volume> {
    const file = await VolumeFile.open(volumePath, { metaDir: opts.metaDir });
    const metaFiles: NodeBlockFile[] = [];
    try {
      if (file.meta.role !== 'primary') {
        // Writing a replica behind its primary's back would diverge it silently.
        throw new VolrepError(
          'VOLREP_ERR_META',
          `${volumePath} is a replica: make it the primary with 'volrep promote --volume ${volumePath}' (failover), or serve it with --read-only to inspect it`,
        );
      }
      const log = await openMetadataFile(
        file.metaDir,
        LOG_FILE,
        'the transaction log says which regions were being written',
      );
      metaFiles.push(log);
      const bitmap = await openMetadataFile(
        file.metaDir,
        BITMAP_FILE,
        'the bitmap says which regions may differ from the replica',
      );
      metaFiles.push(bitmap);
      const pairState = await openMetadataFile(
        file.metaDir,
        PAIR_STATE_FILE,
        'the pair state says whether a replica was ever in sync',
      );
      metaFiles.push(pairState);
      const raw = new FileDevice(file.fd, file.size);
      const { meta } = file;
      const windowBytes = opts.activityWindowBytes ?? DEFAULT_ACTIVITY_WINDOW_BYTES;
      const node = await withMetaDirName(file.metaDir, () =>
        PrimaryNode.open(
          { log, bitmap, pairState, volume: raw },
          {
            volumeSize: meta.size,
            regionSize: meta.regionSize,
            activityWindowRegions: Math.max(1, Math.floor(windowBytes / meta.regionSize)),
            inflightBytesMax: opts.inflightBytesMax ?? DEFAULT_INFLIGHT_BYTES,
            ackTimeoutMs: opts.ackTimeoutMs ?? DEFAULT_ACK_TIMEOUT_MS,
            syncMode: opts.syncMode ?? false,
          },
          {
            clock: systemClock,
            logger: opts.logger ?? SILENT,
            link: opts.link && {
              ...opts.link,
              hello: { volumeId: meta.volumeId, size: meta.size, regionSize: meta.regionSize },
            },
            onFailure: opts.onFailure,
            volumeId: meta.volumeId,
            volumeAsCreated: (mark) => stillBornZero(file.fd, mark),
          },
        ),
      );
      return new Volume(file, node, raw, metaFiles);
    } catch (err) {
      for (const f of metaFiles) await f.close();
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

  /** What crash recovery found when the volume was opened. */
  get recovery(): RecoveryReport {
    return this.node.recovery;
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
    return new Promise((resolve, reject) => this.node.flush((err) => (err ? reject(err) : resolve())));
  }

  status(): VolumeStatus & PrimaryNodeStatus {
    const s = this.node.status();
    return { ...s, dirtyBytes: s.dirtyRegions * this.meta.regionSize };
  }

  /** Dirty regions as [first, last] runs, in order. */
  dirtyRanges(): [number, number][] {
    return this.node.dirtyRanges();
  }

  /** Flushes the volume, persists the bitmap, and releases it. */
  async close(): Promise<void> {
    await this.node.close();
    for (const f of this.metaFiles) await f.close();
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

/**
 * Writes collected in order and committed as one engine transaction. A write larger than
 * WRITE_BYTES_MAX (one update on the stream) becomes several writes of the same transaction.
 */
export class Transaction {
  private readonly writes: NodeWrite[] = [];
  private committed = false;

  constructor(private readonly volume: Volume) {}

  write(offset: number, data: Uint8Array): this {
    this.checkOpen(offset, data.length);
    for (let at = 0; at < data.length; at += WRITE_BYTES_MAX) {
      const piece = data.subarray(at, Math.min(data.length, at + WRITE_BYTES_MAX));
      this.writes.push({ offset: offset + at, kind: 'data', length: piece.length, data: [piece] });
    }
    return this;
  }

  /** @internal A write whose bytes are `chunks` in order (at most WRITE_BYTES_MAX in all). */
  writeChunks(offset: number, chunks: readonly Uint8Array[], length: number): this {
    this.checkOpen(offset, length);
    if (length > WRITE_BYTES_MAX) {
      throw new VolrepError(
        'VOLREP_ERR_USAGE',
        `a write of ${length} bytes is over ${WRITE_BYTES_MAX} for one piece`,
      );
    }
    if (length > 0) this.writes.push({ offset, kind: 'data', length, data: chunks });
    return this;
  }

  zero(offset: number, length: number): this {
    return this.addEmpty(offset, length, 'zero');
  }

  trim(offset: number, length: number): this {
    return this.addEmpty(offset, length, 'trim');
  }

  /**
   * Resolves when every write is on the volume (not yet durable: call flush() for that, or
   * pass `fua`, which also makes it a barrier on the stream).
   */
  commit(options: TransactionOptions = {}): Promise<void> {
    return new Promise((resolve, reject) =>
      this.commitWith(options, (err) => (err ? reject(err) : resolve())),
    );
  }

  /**
   * @internal commit() with a callback (the NBD path: no promise hop); `released` once the
   * node reads the writes' data no more (see PrimaryNode.submit).
   */
  commitWith(options: TransactionOptions, done: Done, released?: Released): void {
    if (this.committed) {
      released?.(true);
      return done(new VolrepError('VOLREP_ERR_USAGE', 'transaction already committed'));
    }
    this.committed = true;
    if (this.writes.length === 0) {
      released?.(true);
      return done(null);
    }
    try {
      this.volume.node.submit(this.writes, options, done, released); // lets go of the data in every case
    } catch (err) {
      done(err as Error);
    }
  }

  private addEmpty(offset: number, length: number, kind: WriteKind): this {
    this.checkOpen(offset, length);
    for (let at = 0; at < length; at += WRITE_BYTES_MAX) {
      this.writes.push({ offset: offset + at, kind, length: Math.min(WRITE_BYTES_MAX, length - at) });
    }
    return this;
  }

  private checkOpen(offset: number, length: number): void {
    if (this.committed) throw new VolrepError('VOLREP_ERR_USAGE', 'transaction already committed');
    this.volume.checkRange(offset, length);
  }
}

/** The NBD server's view: writes go through the engine (FUA and FLUSH too), reads straight to the file. */
class EngineDevice implements BlockDevice {
  readonly readOnly = false;
  readonly size: number;
  /** The node lets go of a write's data once it is on the volume and, replicating, sent on. */
  readonly reportsRelease = true;

  constructor(
    private readonly volume: Volume,
    private readonly raw: FileDevice,
  ) {
    this.size = raw.size;
  }

  read(offset: number, length: number, buf: Buffer, at: number, done: Done): void {
    this.raw.read(offset, length, buf, at, done);
  }

  write(offset: number, data: Buffer[], length: number, fua: boolean, done: Done, released?: Released): void {
    // The payload stays as the socket chunks it arrived in, through the volume write and the send.
    this.run(() => this.volume.transaction().writeChunks(offset, data, length), fua, done, released);
  }

  writeZeroes(offset: number, length: number, fua: boolean, done: Done): void {
    this.run(() => this.volume.transaction().zero(offset, length), fua, done);
  }

  trim(offset: number, length: number, fua: boolean, done: Done): void {
    this.run(() => this.volume.transaction().trim(offset, length), fua, done);
  }

  flush(done: Done): void {
    this.volume.node.flush(done);
  }

  private run(build: () => Transaction, fua: boolean, done: Done, released?: Released): void {
    let tx: Transaction;
    try {
      tx = build();
    } catch (err) {
      released?.(true);
      return done(err as Error);
    }
    tx.commitWith({ fua }, done, released);
  }
}

/** Errors of the metadata formats name no directory: add it. */
