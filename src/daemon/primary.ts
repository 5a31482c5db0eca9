/**
 * The primary daemon: opens the volume with the replication engine in its write path, serves it
 * over NBD and, if asked, status and metrics over HTTP.
 */
import path from 'node:path';
import type { Logger } from 'pino';
import { Counter, Gauge } from 'prom-client';
import { NbdServer } from '../nbd/server.js';
import { formatHostPort, type HostPort } from '../util/address.js';
import { requireLoopback } from '../util/loopback.js';
import { FileDevice } from '../volume/file-device.js';
import { DEFAULT_ACK_TIMEOUT_MS, Volume, type VolumeStatus } from '../volume/replicated.js';
import { VolumeFile } from '../volume/volume.js';
import { startHttp } from './http.js';
import { listenError } from './listen-error.js';
import { Metrics } from './metrics.js';
import { PrimaryReplication, type ReplicationStatus } from './replication.js';

export interface PrimaryOptions {
  volumePath: string;
  metaDir?: string;
  nbd: HostPort;
  exportName: string;
  http?: HostPort;
  /** Serve without the engine and refuse writes. */
  readOnly?: boolean;
  activityWindowBytes?: number;
  /** Replicate to this secondary (loopback only until replication is authenticated). */
  peer?: HostPort;
  mode?: 'async' | 'sync';
  ackTimeoutMs?: number;
  /** Bytes of updates in flight to the secondary before writes wait. */
  windowBytes?: number;
  assumeClean?: boolean;
  logger: Logger;
}

export interface RunningPrimary {
  nbdAddress: string;
  httpAddress?: string;
  status(): PrimaryStatus;
  /** Graceful stop: stop accepting, finish in-flight requests, flush, persist the bitmap, release. */
  close(): Promise<void>;
}

export interface PrimaryStatus extends Partial<VolumeStatus>, Partial<ReplicationStatus> {
  role: 'primary';
  volume: { path: string; id: string; size: number; regionSize: number };
  nbd: { address: string; export: string; connections: number };
}

/** Either the engine-backed volume or, read-only, the bare file. */
interface Served {
  file: VolumeFile;
  device: FileDevice | Volume['device'];
  volume?: Volume;
  replication?: PrimaryReplication;
  close(): Promise<void>;
}

async function openServed(opts: PrimaryOptions): Promise<Served> {
  if (opts.readOnly) {
    const file = await VolumeFile.open(opts.volumePath, { metaDir: opts.metaDir, readOnly: true });
    const device = new FileDevice(file.fd, file.size, true);
    return { file, device, close: () => file.close() };
  }
  if (opts.peer) requireLoopback(opts.peer.host, '--peer');
  const replication = opts.peer
    ? new PrimaryReplication({
        peer: opts.peer,
        assumeClean: opts.assumeClean ?? false,
        ackTimeoutMs: opts.ackTimeoutMs ?? DEFAULT_ACK_TIMEOUT_MS,
        logger: opts.logger,
      })
    : undefined;
  const volume = await Volume.open(opts.volumePath, {
    metaDir: opts.metaDir,
    activityWindowBytes: opts.activityWindowBytes,
    inflightBytesMax: opts.windowBytes,
    ackTimeoutMs: opts.ackTimeoutMs,
    sink: replication,
  });
  volume.driver.syncMode = opts.mode === 'sync';
  try {
    await replication?.start(volume);
  } catch (err) {
    await volume.close();
    throw err;
  }
  return {
    file: volume.file,
    device: volume.device,
    volume,
    replication,
    async close() {
      await replication?.stop();
      await volume.close();
    },
  };
}

export async function startPrimary(opts: PrimaryOptions): Promise<RunningPrimary> {
  const served = await openServed(opts);
  const { file, volume, replication } = served;
  const metrics = new Metrics();
  if (volume) registerEngineMetrics(metrics, volume, replication);
  const nbd = new NbdServer(served.device, {
    exportName: opts.exportName,
    logger: opts.logger,
    stats: metrics,
  });
  let nbdAddress: string;
  try {
    const bound = await nbd.listen(opts.nbd.host, opts.nbd.port);
    nbdAddress = formatHostPort({ host: bound.address, port: bound.port });
  } catch (err) {
    await served.close();
    throw listenError(err, 'NBD', opts.nbd);
  }

  const status = (): PrimaryStatus => ({
    role: 'primary',
    volume: {
      path: path.resolve(file.path),
      id: file.meta.volumeId,
      size: file.size,
      regionSize: file.meta.regionSize,
    },
    nbd: { address: nbdAddress, export: opts.exportName, connections: nbd.connectionCount },
    ...volume?.status(),
    ...replication?.status(),
  });
  const routes: Record<string, () => unknown> = volume
    ? { '/dirty': () => ({ regionSize: file.meta.regionSize, ranges: volume.dirtyRanges() }) }
    : {};

  let http: Awaited<ReturnType<typeof startHttp>> | undefined;
  if (opts.http) {
    try {
      http = await startHttp(opts.http.host, opts.http.port, status, metrics.registry, opts.logger, routes);
    } catch (err) {
      await nbd.close();
      await served.close();
      throw listenError(err, 'HTTP', opts.http);
    }
  }
  const httpAddress = http && formatHostPort({ host: http.address.address, port: http.address.port });
  opts.logger.info(
    {
      volume: file.path,
      nbd: nbdAddress,
      http: httpAddress,
      peer: opts.peer,
      mode: opts.mode,
      recovery: volume?.driver.recovery,
    },
    'primary serving',
  );

  let closing: Promise<void> | undefined;
  return {
    nbdAddress,
    httpAddress,
    status,
    close() {
      closing ??= (async () => {
        await nbd.close();
        await http?.close();
        await served.close();
        opts.logger.info('primary stopped');
      })();
      return closing;
    },
  };
}

/** Gauges read from the engine when /metrics is scraped, counters from the driver's tallies. */
function registerEngineMetrics(metrics: Metrics, volume: Volume, replication?: PrimaryReplication): void {
  const registers = [metrics.registry];
  const engine = () => volume.driver.engine.stats();
  const counters = volume.driver.counters;
  new Gauge({
    name: 'volrep_dirty_regions',
    help: 'Regions that may differ from the replica',
    registers,
    collect() {
      this.set(engine().dirtyRegions);
    },
  });
  new Gauge({
    name: 'volrep_pending_updates',
    help: 'Updates issued and not yet acknowledged by the secondary',
    registers,
    collect() {
      this.set(engine().pendingUpdates);
    },
  });
  new Gauge({
    name: 'volrep_log_used_bytes',
    help: 'Bytes of the transaction log in use',
    registers,
    collect() {
      const s = engine();
      this.set(s.logHeadLsn - s.logFreedLsn);
    },
  });
  const tally = (name: string, help: string, read: () => number) =>
    new Counter({
      name,
      help,
      registers,
      collect() {
        this.reset();
        this.inc(read());
      },
    });
  tally('volrep_log_syncs_total', 'Log write+fdatasync batches (group commits)', () => counters.logSyncs);
  tally('volrep_log_records_total', 'Log records appended', () => counters.logRecords);
  tally('volrep_bitmap_persists_total', 'Persistent bitmap writes', () => counters.bitmapPersists);
  tally('volrep_volume_syncs_total', 'Volume fdatasyncs issued by the engine', () => counters.volumeSyncs);
  tally(
    'volrep_replicated_bytes_total',
    'Bytes of client updates sent to the secondary',
    () => counters.replicatedBytes,
  );
  tally(
    'volrep_resync_bytes_total',
    'Bytes of resync content sent to the secondary',
    () => counters.resyncBytes,
  );
  tally('volrep_acks_total', 'Acks received from the secondary', () => counters.acks);
  tally('volrep_reconnects_total', 'Reconnections after a lost link', () => replication?.reconnects ?? 0);
  new Gauge({
    name: 'volrep_peer_connected',
    help: '1 while connected to the secondary',
    registers,
    collect() {
      const state = replication?.status().peer.state;
      this.set(state === 'connected' || state === 'resyncing' ? 1 : 0);
    },
  });
}
