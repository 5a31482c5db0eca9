/**
 * The engine core driven with real files: the log and the bitmap in a metadata directory via
 * node:fs, the volume and the replication stream behind small interfaces the caller provides.
 *
 * Dev notes. Every event goes into the engine synchronously; `pump()` then performs the actions
 * in order. Actions that do I/O start it and feed its completion back as the next event, so
 * several volume writes, one log sync and one bitmap persist can be in flight at once. A failed
 * log or bitmap write is fatal (the durable state can no longer be trusted): every pending
 * transaction is rejected and the driver refuses further work.
 */
import { mkdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { type Action, Engine, type EngineConfig, type WriteKind } from '../core/engine.js';
import { EngineError } from '../core/errors.js';
import { BitmapFile } from './bitmap-file.js';
import { NodeBlockFile } from './block-file.js';
import { LogFile } from './log-file.js';
import { type RecoveryReport, recover } from './recovery.js';

/** How often the driver ticks the engine (ack timeouts, volume syncs). */
export const DRIVER_TICK_MS = 100;
export const LOG_FILE_NAME = 'log';
export const BITMAP_FILE_NAME = 'bitmap';

/** A write's bytes as the pieces they arrived in (e.g. socket chunks), never joined by the driver. */
export type Chunks = readonly Uint8Array[];

/** The volume as the driver needs it. `data` is null for zero and trim: write zeroes. */
export interface VolumeIo {
  write(offset: number, length: number, kind: WriteKind, data: Chunks | null): Promise<void>;
  read(offset: number, length: number): Promise<Uint8Array>;
  sync(): Promise<void>;
}

/** The replication stream. The driver calls these in stream order. */
export interface UpdateSink {
  send(update: {
    updateId: number;
    offset: number;
    length: number;
    kind: WriteKind;
    data: Chunks | null;
    /** Resync content (a region read from the volume) rather than a client write. */
    resync: boolean;
  }): void;
  sendBarrier(barrierId: number, afterUpdateId: number): void;
  /** The engine gave up on the connection (ack timeout): close it, then call disconnected(). */
  disconnect(reason: string): void;
}

export interface DriverWrite {
  offset: number;
  kind: WriteKind;
  /** The bytes for 'data' (one buffer or its pieces); for 'zero' and 'trim' only `length` is used. */
  data?: Uint8Array | Chunks;
  length?: number;
}

interface PendingTx {
  data: Array<Chunks | null>;
  resolve: () => void;
  reject: (err: unknown) => void;
}

export class ReplicationDriver {
  private readonly txs = new Map<number, PendingTx>();
  /** Buffers by update id, from the volume write (or resync read) until send or drop. */
  private readonly buffers = new Map<number, Chunks | null>();
  private failure: unknown = null;
  private timer: NodeJS.Timeout | null = null;
  private pumping = false;
  private ioCount = 0;
  private idleWaiters: Array<() => void> = [];
  /** Counts of durable-state work, for metrics. */
  readonly counters = {
    logRecords: 0,
    logSyncs: 0,
    bitmapPersists: 0,
    volumeSyncs: 0,
    replicatedBytes: 0,
    resyncBytes: 0,
    acks: 0,
  };
  /**
   * Sync mode: a transaction completes only when the secondary has acked its last update. While
   * there is no connection, transactions complete locally (their regions stay dirty).
   */
  syncMode = false;
  /** Highest update id of each transaction in progress (for sync mode). */
  private readonly txLastId = new Map<number, number>();
  /** Sync mode: transactions on the volume, waiting for the ack of their last update. */
  private awaitingAck: Array<{ lastId: number; resolve: () => void }> = [];
  private checkpointWaiters: Array<() => void> = [];

  private constructor(
    readonly engine: Engine,
    private readonly log: LogFile,
    private readonly bitmap: BitmapFile,
    private readonly files: NodeBlockFile[],
    private readonly volume: VolumeIo,
    private readonly sink: UpdateSink,
    readonly recovery: RecoveryReport,
  ) {}

  /**
   * Opens (or creates and formats) the log and bitmap files in `metaDir`, recovers, and starts
   * the engine. `logFileBytes` sizes a new log file.
   */
  static async open(
    metaDir: string,
    config: Omit<EngineConfig, 'logCapacity'> & { logFileBytes: number },
    volume: VolumeIo,
    sink: UpdateSink,
  ): Promise<ReplicationDriver> {
    await mkdir(metaDir, { recursive: true });
    const regionCount = Math.ceil(config.volumeSize / config.regionSize);
    const logPath = join(metaDir, LOG_FILE_NAME);
    const bitmapPath = join(metaDir, BITMAP_FILE_NAME);
    const files: NodeBlockFile[] = [];
    try {
      if (!(await exists(logPath))) {
        const f = await NodeBlockFile.create(logPath, config.logFileBytes);
        await LogFile.format(f);
        await f.close();
      }
      if (!(await exists(bitmapPath))) {
        const f = await NodeBlockFile.create(bitmapPath, BitmapFile.fileBytes(regionCount));
        await BitmapFile.format(f, regionCount);
        await f.close();
      }
      const logFile = await NodeBlockFile.open(logPath);
      files.push(logFile);
      const bitmapFile = await NodeBlockFile.open(bitmapPath);
      files.push(bitmapFile);
      const r = await recover(logFile, bitmapFile, regionCount);
      const { logFileBytes: _, ...engineConfig } = config;
      const engine = new Engine({ ...engineConfig, logCapacity: r.log.capacity }, r.state);
      const driver = new ReplicationDriver(engine, r.log, r.bitmap, files, volume, sink, r.report);
      driver.timer = setInterval(() => driver.event((now) => engine.handleTick(now)), DRIVER_TICK_MS);
      driver.timer.unref();
      driver.pump();
      return driver;
    } catch (err) {
      for (const f of files) await f.close();
      throw err;
    }
  }

  /** Bytes of the log's record area. */
  get logCapacity(): number {
    return this.log.capacity;
  }

  /** One transaction: resolves once every write is on the volume (and logged before that). */
  write(writes: DriverWrite[]): Promise<void> {
    if (this.failure !== null) return Promise.reject(this.failure);
    const requests = writes.map((w) => ({
      offset: w.offset,
      length: w.kind === 'data' ? chunksLength(w.data) : (w.length ?? 0),
      kind: w.kind,
    }));
    return new Promise<void>((resolve, reject) => {
      const txId = this.engine.submitTransaction(requests, now());
      this.txs.set(txId, {
        data: writes.map((w) => (w.kind === 'data' ? asChunks(w.data!) : null)),
        resolve,
        reject,
      });
      this.pump();
    });
  }

  /** A client FLUSH: a barrier on the stream (H13). The caller syncs the volume itself. */
  barrier(): void {
    this.event((t) => this.engine.submitBarrier(t));
  }

  /** A cumulative ack. Throws VOLREP_ERR_PROTOCOL (state unchanged) for an id never sent. */
  ack(updateId: number): void {
    this.event((t) => this.engine.handleAck(updateId, t));
    this.counters.acks++;
    this.releaseAcked(updateId);
  }

  /** Throws VOLREP_ERR_PROTOCOL (state unchanged) if the secondary claims an id never issued. */
  connected(lastAppliedId: number): void {
    this.event((t) => this.engine.handleConnected(lastAppliedId, t));
    this.releaseAcked(lastAppliedId);
  }

  disconnected(): void {
    this.event((t) => this.engine.handleDisconnected(t));
    // Sync mode degrades to local completion while there is no secondary to wait for.
    for (const w of this.awaitingAck.splice(0)) w.resolve();
  }

  /** Marks every region dirty (full sync) and resolves once that is durable in the bitmap. */
  markAllDirty(): Promise<void> {
    this.event((t) => this.engine.markAllDirty(t));
    return this.checkpointSettled();
  }

  /** A barrier whose id the caller can recognise when the sink gets it. */
  submitBarrier(): number {
    let id = 0;
    this.event((t) => {
      id = this.engine.submitBarrier(t);
    });
    return id;
  }

  private checkpointSettled(): Promise<void> {
    if (this.failure !== null) return Promise.reject(this.failure);
    if (!this.engine.stats().checkpointInFlight) return Promise.resolve();
    return new Promise((resolve) => this.checkpointWaiters.push(resolve));
  }

  private releaseAcked(ackedId: number): void {
    if (this.awaitingAck.length === 0) return;
    const still: typeof this.awaitingAck = [];
    for (const w of this.awaitingAck) {
      if (w.lastId <= ackedId) w.resolve();
      else still.push(w);
    }
    this.awaitingAck = still;
  }

  /** Persists the bitmap, waits for all I/O to settle, and closes the files. */
  async close(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    if (this.failure === null) this.event((t) => this.engine.requestCheckpoint(t));
    while (this.ioCount > 0 || (this.failure === null && this.engine.stats().checkpointInFlight)) {
      await new Promise<void>((resolve) => this.idleWaiters.push(resolve));
    }
    for (const f of this.files) await f.close();
  }

  private event(fn: (now: number) => void): void {
    if (this.failure !== null) return;
    fn(now());
    this.pump();
  }

  private pump(): void {
    if (this.pumping) return; // an action's synchronous callback re-entered: the loop continues
    this.pumping = true;
    try {
      for (let a = this.engine.pollAction(); a !== undefined; a = this.engine.pollAction()) this.perform(a);
    } finally {
      this.pumping = false;
    }
  }

  private perform(a: Action): void {
    switch (a.type) {
      case 'appendLog':
        this.counters.logRecords++;
        this.log.append(a.record);
        break;
      case 'syncLog':
        this.counters.logSyncs++;
        this.io(this.log.flush(), () => this.engine.handleLogSynced(a.throughLsn, now()));
        break;
      case 'freeLog':
        this.log.setTail(a.upToLsn, a.idLimit);
        break;
      case 'writeVolume': {
        this.txLastId.set(a.txId, Math.max(this.txLastId.get(a.txId) ?? 0, a.updateId));
        const data = this.txs.get(a.txId)?.data[a.index] ?? null;
        this.buffers.set(a.updateId, data);
        this.io(this.volume.write(a.offset, a.length, a.kind, data), () =>
          this.engine.handleVolumeWritten(a.updateId, now()),
        );
        break;
      }
      case 'readRegion':
        this.io(
          this.volume.read(a.offset, a.length).then((buf) => this.buffers.set(a.updateId, [buf])),
          () => this.engine.handleResyncRead(a.updateId, now()),
        );
        break;
      case 'send': {
        const data = this.buffers.get(a.updateId) ?? null;
        this.buffers.delete(a.updateId);
        const resync = a.source.type === 'resync';
        if (resync) this.counters.resyncBytes += a.length;
        else this.counters.replicatedBytes += a.length;
        this.sink.send({
          updateId: a.updateId,
          offset: a.offset,
          length: a.length,
          kind: a.kind,
          data,
          resync,
        });
        break;
      }
      case 'dropUpdate':
        this.buffers.delete(a.updateId);
        break;
      case 'complete': {
        const tx = this.txs.get(a.txId);
        this.txs.delete(a.txId);
        const lastId = this.txLastId.get(a.txId) ?? 0;
        this.txLastId.delete(a.txId);
        if (tx && this.syncMode && this.engine.isConnected())
          this.awaitingAck.push({ lastId, resolve: tx.resolve });
        else tx?.resolve();
        break;
      }
      case 'persistBitmap':
        this.counters.bitmapPersists++;
        this.io(this.bitmap.persist(a.bitmap, a.coveredLsn, a.idLimit), () => {
          this.engine.handleBitmapPersisted(a.checkpointId, now());
          if (!this.engine.stats().checkpointInFlight) {
            for (const wake of this.checkpointWaiters.splice(0)) wake();
          }
        });
        break;
      case 'syncVolume':
        this.counters.volumeSyncs++;
        this.io(this.volume.sync(), () => this.engine.handleVolumeSynced(a.syncId, now()));
        break;
      case 'sendBarrier':
        this.sink.sendBarrier(a.barrierId, a.afterUpdateId);
        break;
      case 'disconnect':
        this.sink.disconnect(a.reason);
        break;
    }
  }

  /** Runs I/O and feeds its completion back; a failure is fatal. */
  private io(work: Promise<unknown>, done: () => void): void {
    this.ioCount += 1;
    work
      .then(
        () => this.event(done),
        (err) => this.fail(err),
      )
      .finally(() => {
        this.ioCount -= 1;
        for (const wake of this.idleWaiters.splice(0)) wake();
      });
  }

  private fail(err: unknown): void {
    if (this.failure !== null) return;
    this.failure = new EngineError(
      'VOLREP_ERR_STATE',
      `replication engine stopped after an I/O error: ${String(err)}`,
      {
        cause: err,
      },
    );
    if (this.timer) clearInterval(this.timer);
    for (const tx of this.txs.values()) tx.reject(this.failure);
    this.txs.clear();
    for (const w of this.awaitingAck.splice(0)) w.resolve();
  }
}

function asChunks(data: Uint8Array | Chunks): Chunks {
  return data instanceof Uint8Array ? [data] : data;
}

function chunksLength(data: Uint8Array | Chunks | undefined): number {
  if (data === undefined) return 0;
  if (data instanceof Uint8Array) return data.length;
  let n = 0;
  for (const c of data) n += c.length;
  return n;
}

function now(): number {
  return performance.now();
}

async function exists(path: string): Promise<boolean> {
  try {
    await stat(path);
    return true;
  } catch {
    return false;
  }
}
