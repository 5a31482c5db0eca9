/**
 * The primary daemon: opens the volume with the replication engine in its write path, serves it
 * over NBD, replicates over TCP if given a peer, and serves status and metrics over HTTP if
 * asked. It only wires files, sockets and timers to the node (src/shell/primary-node.ts).
 */
import { promises as fsp } from 'node:fs';
import type net from 'node:net';
import path from 'node:path';
import type { Logger } from 'pino';
import { Counter, Gauge } from 'prom-client';
import { VolrepError } from '../errors.js';
import { systemClock } from '../io/clock.js';
import { tcpDialer } from '../io/net.js';
import { type LinkSecurity, replicationListener, tlsDialer } from '../io/tls.js';
import { TlsAcceptor } from '../io/tls-acceptor.js';
import type { Dialer } from '../io/transport.js';
import type { NbdTlsMode } from '../nbd/handshake.js';
import { NbdServer, type NbdTls } from '../nbd/server.js';
import { encodeRefusalFrame } from '../replication/messages.js';
import { identityName, loadIdentity } from '../security/identity.js';
import type { PrimaryNodeStatus } from '../shell/primary-node.js';
import { PrimaryResponder } from '../shell/primary-responder.js';
import { formatHostPort, type HostPort } from '../util/address.js';
import { isLoopback } from '../util/loopback.js';
import { FileDevice } from '../volume/file-device.js';
import { readMeta } from '../volume/meta.js';
import { DEFAULT_ACK_TIMEOUT_MS, Volume, type VolumeStatus } from '../volume/replicated.js';
import { defaultMetaDir, VolumeFile } from '../volume/volume.js';
import { type GenerationStatus, generationStatus } from './handshake-status.js';
import { startHttp } from './http.js';
import { type LinkSecurityOptions, resolveLinkSecurity } from './link-security.js';
import { listenError } from './listen-error.js';
import { repeatLimitedWarn } from './logger.js';
import { Metrics } from './metrics.js';

export interface PrimaryOptions {
  volumePath: string;
  metaDir?: string;
  nbd: HostPort;
  exportName: string;
  /** NBD over TLS (NBD_OPT_STARTTLS); off by default. */
  nbdTls?: NbdTlsOptions;
  /** Serve NBD without TLS on a non-loopback address anyway. */
  nbdInsecure?: boolean;
  http?: HostPort;
  /** Serve without the engine and refuse writes. */
  readOnly?: boolean;
  activityWindowBytes?: number;
  /** Replicate to this secondary. */
  peer?: HostPort;
  /** Answer (and refuse) primaries that dial this replication address: a promoted replica's old one. */
  listen?: HostPort;
  /** With a peer: whom to trust over TLS (the default), or plaintext on loopback. */
  link?: LinkSecurityOptions;
  mode?: 'async' | 'sync';
  ackTimeoutMs?: number;
  /** Bytes of updates in flight to the secondary before writes wait. */
  windowBytes?: number;
  assumeClean?: boolean;
  logger: Logger;
  /** The engine stopped after an I/O failure (the daemon should stop and exit non-zero). */
  onFailure?: (err: Error) => void;
}

export interface RunningPrimary {
  nbdAddress: string;
  httpAddress?: string;
  status(): PrimaryStatus;
  /** Graceful stop: stop accepting, finish in-flight requests, flush, persist the bitmap, release. */
  close(): Promise<void>;
}

export type PeerState = 'connecting' | 'connected' | 'resyncing' | 'disconnected';

export interface ReplicationStatus {
  /** `tls`: the link is TLS; `fingerprint`: the secondary's certificate, once verified; `self`: this node's. */
  peer: { address: string; state: PeerState; tls: boolean; fingerprint: string | null; self: string | null };
  resync: { totalBytes: number; doneBytes: number; bytesPerSecond: number };
  replica: { consistent: boolean; lastAckedUpdate: number };
}

export interface PrimaryStatus
  extends Partial<Omit<VolumeStatus, 'resync' | 'generations' | 'handshake'>>,
    Partial<ReplicationStatus>,
    Partial<GenerationStatus> {
  role: 'primary';
  volume: { path: string; id: string; size: number; regionSize: number };
  nbd: { address: string; export: string; connections: number };
}

/** Either the engine-backed volume or, read-only, the bare file. */
interface Served {
  file: VolumeFile;
  device: FileDevice | Volume['device'];
  volume?: Volume;
  security?: LinkSecurity;
  close(): Promise<void>;
}

async function openServed(opts: PrimaryOptions, authFailures: { count: number }): Promise<Served> {
  if (opts.readOnly) {
    const file = await VolumeFile.open(opts.volumePath, { metaDir: opts.metaDir, readOnly: true });
    const device = new FileDevice(file.fd, file.size, true);
    return { file, device, close: () => file.close() };
  }
  const peer = opts.peer;
  let dialer: Dialer | undefined;
  let security: LinkSecurity | undefined;
  if (peer) {
    if (opts.link === undefined)
      throw new VolrepError('VOLREP_ERR_USAGE', '--peer needs to know how to trust the secondary');
    const metaDir = opts.metaDir ?? defaultMetaDir(opts.volumePath);
    const meta = await readMeta(metaDir);
    security = await resolveLinkSecurity(
      opts.link,
      metaDir,
      identityName('primary', meta.volumeId),
      peer,
      '--peer',
      opts.logger,
    );
    // Redialed up to 20 times a second while not there: the same refusal is logged once per interval.
    const warnRefused = repeatLimitedWarn(opts.logger, 'replication connection refused');
    dialer = security
      ? tlsDialer(
          peer.host,
          peer.port,
          security,
          (f) => {
            authFailures.count += 1;
            warnRefused({ peer: f.remote, fingerprint: f.fingerprint, reason: f.reason });
          },
          (f) => opts.logger.debug({ peer: f.remote, reason: f.reason }, 'replication handshake cut off'),
        )
      : tcpDialer(peer.host, peer.port);
  }
  const volume = await Volume.open(opts.volumePath, {
    metaDir: opts.metaDir,
    activityWindowBytes: opts.activityWindowBytes,
    inflightBytesMax: opts.windowBytes,
    ackTimeoutMs: opts.ackTimeoutMs ?? DEFAULT_ACK_TIMEOUT_MS,
    syncMode: opts.mode === 'sync',
    logger: opts.logger,
    onFailure: opts.onFailure,
    link: dialer ? { dialer, assumeClean: opts.assumeClean ?? false } : undefined,
  });
  return { file: volume.file, device: volume.device, volume, security, close: () => volume.close() };
}

function listenOn(server: net.Server, at: HostPort): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen({ host: at.host, port: at.port, exclusive: true }, () => {
      server.off('error', reject);
      resolve();
    });
  });
}

/** The peer's state for a person: connecting, connected (in sync or streaming), resyncing, disconnected. */
function peerState(link: NonNullable<PrimaryNodeStatus['link']>): PeerState {
  switch (link.state) {
    case 'streaming':
      return link.replicaConsistent ? 'connected' : 'resyncing';
    case 'marking':
      return 'resyncing';
    case 'connecting':
    case 'greeting':
      return 'connecting';
    default:
      return 'disconnected';
  }
}

export interface NbdTlsOptions {
  mode: NbdTlsMode;
  certFile: string;
  keyFile: string;
  /** Require client certificates signed by this CA (PEM file). */
  caFile?: string;
}

/** The NBD server's TLS, checked before anything is opened: the key private, the files readable. */
async function nbdTls(opts: PrimaryOptions): Promise<NbdTls | undefined> {
  const mode = opts.nbdTls?.mode ?? 'off';
  if (mode !== 'require' && !isLoopback(opts.nbd.host)) {
    if (!opts.nbdInsecure) {
      throw new VolrepError(
        'VOLREP_ERR_ADDRESS',
        `--nbd ${formatHostPort(opts.nbd)} is not a loopback address and NBD is not TLS-only: add --nbd-tls require with --nbd-tls-cert and --nbd-tls-key, or --nbd-insecure to serve it in the clear anyway`,
      );
    }
    opts.logger.warn(
      { nbd: formatHostPort(opts.nbd), tls: mode },
      'serving NBD without required TLS on a non-loopback address (--nbd-insecure)',
    );
  }
  if (mode === 'off' || opts.nbdTls === undefined) return undefined;
  const identity = await loadIdentity(opts.nbdTls.certFile, opts.nbdTls.keyFile);
  let ca: string | undefined;
  if (opts.nbdTls.caFile !== undefined) {
    ca = await fsp.readFile(opts.nbdTls.caFile, 'utf8').catch((err: Error) => {
      throw new VolrepError('VOLREP_ERR_NOT_FOUND', `--nbd-tls-ca ${opts.nbdTls?.caFile}: ${err.message}`);
    });
  }
  return {
    mode,
    acceptor: new TlsAcceptor({
      key: identity.key,
      cert: identity.cert,
      ca,
      minVersion: 'TLSv1.2',
      requestCert: ca !== undefined,
    }),
    requireClientCert: ca !== undefined,
  };
}

export async function startPrimary(opts: PrimaryOptions): Promise<RunningPrimary> {
  const nbdTlsConfig = await nbdTls(opts);
  const authFailures = { count: 0 };
  const served = await openServed(opts, authFailures);
  const { file, volume } = served;
  const metrics = new Metrics();
  if (volume) registerEngineMetrics(metrics, volume, authFailures);
  registerRoleMetric(metrics, 'primary');
  const nbd = new NbdServer(served.device, {
    exportName: opts.exportName,
    logger: opts.logger,
    stats: metrics,
    tls: nbdTlsConfig,
  });
  let nbdAddress: string;
  try {
    const bound = await nbd.listen(opts.nbd.host, opts.nbd.port);
    nbdAddress = formatHostPort({ host: bound.address, port: bound.port });
  } catch (err) {
    await served.close();
    throw listenError(err, 'NBD', opts.nbd);
  }

  const replicationStatus = (s: PrimaryNodeStatus): ReplicationStatus | undefined => {
    if (!s.link || !opts.peer) return undefined;
    const state = peerState(s.link);
    const seconds = (performance.now() - s.resync.startedAtMs) / 1000;
    const done = Math.min(s.resync.totalBytes, s.resync.doneBytes);
    return {
      peer: {
        address: formatHostPort(opts.peer),
        state,
        tls: served.security !== undefined,
        fingerprint: s.connection?.fingerprint ?? null,
        self: served.security?.identity.fingerprint ?? null,
      },
      resync: {
        totalBytes: s.resync.totalBytes,
        doneBytes: done,
        bytesPerSecond: s.resync.active && seconds > 0 ? Math.round(done / seconds) : 0,
      },
      replica: { consistent: s.link.replicaConsistent, lastAckedUpdate: s.link.lastAckedUpdate },
    };
  };
  const status = (): PrimaryStatus => {
    const base = {
      role: 'primary' as const,
      volume: {
        path: path.resolve(file.path),
        id: file.meta.volumeId,
        size: file.size,
        regionSize: file.meta.regionSize,
      },
      nbd: { address: nbdAddress, export: opts.exportName, connections: nbd.connectionCount },
    };
    if (!volume) return base;
    const s = volume.status();
    const { resync: _resync, link: _link, generations, handshake, ...engine } = s;
    const generation = generationStatus(generations, handshake, {
      side: 'primary',
      connected: s.link?.state === 'streaming',
      resyncBytesLeft: s.resync.active ? s.dirtyRegions * file.meta.regionSize : 0,
    });
    return { ...base, ...engine, ...generation, ...replicationStatus(s) };
  };
  // A promoted replica's old replication address: an old primary that kept serving dials it and
  // is told (and this side learns) what the generations say, typically a split brain.
  let responderServer: net.Server | undefined;
  let responder: PrimaryResponder | undefined;
  if (opts.listen && volume) {
    const node = volume.node;
    responder = new PrimaryResponder(
      { volumeId: file.meta.volumeId, size: file.size, regionSize: file.meta.regionSize },
      () => node.status().generations,
      systemClock,
      opts.logger,
      (report) => {
        opts.logger.error(
          { decision: report.decision, reason: report.reason },
          'a primary dialed this primary',
        );
        node.reportHandshake(report);
      },
    );
    const answer = responder;
    const warnResponderRefused = repeatLimitedWarn(opts.logger, 'replication connection refused');
    responderServer = replicationListener({
      security: served.security,
      onRefused: (f) => {
        authFailures.count += 1;
        warnResponderRefused({ peer: f.remote, fingerprint: f.fingerprint, reason: f.reason });
      },
      onConnection: (connection) => answer.accept(connection),
      refusal: encodeRefusalFrame,
    });
    try {
      await listenOn(responderServer, opts.listen);
    } catch (err) {
      await nbd.close();
      await served.close();
      throw listenError(err, 'replication', opts.listen);
    }
  }
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
      listen: opts.listen && formatHostPort(opts.listen),
      replicationTls: opts.peer ? served.security !== undefined : undefined,
      fingerprint: served.security?.identity.fingerprint,
      nbdTls: opts.nbdTls?.mode ?? 'off',
      mode: opts.mode,
      recovery: volume?.recovery,
    },
    'primary serving',
  );
  if (opts.peer && served.security === undefined) {
    opts.logger.warn(
      'replication link in plaintext (--insecure-plaintext): no authentication, no encryption',
    );
  }

  let closing: Promise<void> | undefined;
  return {
    nbdAddress,
    httpAddress,
    status,
    close() {
      closing ??= (async () => {
        await nbd.close();
        await http?.close();
        responder?.close();
        if (responderServer) await new Promise<void>((resolve) => responderServer.close(() => resolve()));
        await served.close();
        opts.logger.info('primary stopped');
      })();
      return closing;
    },
  };
}

/** Gauges read from the node when /metrics is scraped, counters from its tallies. */
function registerEngineMetrics(metrics: Metrics, volume: Volume, authFailures: { count: number }): void {
  const registers = [metrics.registry];
  const node = () => volume.node.status();
  const counters = volume.node.counters;
  const gauge = (name: string, help: string, read: () => number) =>
    new Gauge({
      name,
      help,
      registers,
      collect() {
        this.set(read());
      },
    });
  gauge('volrep_dirty_regions', 'Regions that may differ from the replica', () => node().dirtyRegions);
  gauge(
    'volrep_pending_updates',
    'Updates issued and not yet acknowledged by the secondary',
    () => node().pendingUpdates,
  );
  gauge('volrep_log_used_bytes', 'Bytes of the transaction log in use', () => node().log.usedBytes);
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
  tally(
    'volrep_volume_syncs_total',
    'Volume fdatasyncs (the engine issues all of them: FLUSH, FUA and its own)',
    () => counters.volumeSyncs,
  );
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
  tally(
    'volrep_resync_zero_bytes_total',
    'Of the resync bytes: regions that read back all-zero, sent as zero updates without their data',
    () => counters.resyncZeroBytes,
  );
  tally('volrep_acks_total', 'Acks received from the secondary', () => counters.acks);
  tally('volrep_reconnects_total', 'Reconnections after a lost link', () => node().link?.reconnects ?? 0);
  tally(
    'volrep_peer_auth_failures_total',
    'Replication connections refused: the secondary presented an unknown, wrong or expired certificate, or the TLS handshake failed',
    () => authFailures.count,
  );
  gauge('volrep_peer_connected', '1 while connected to the secondary', () =>
    node().link?.state === 'streaming' ? 1 : 0,
  );
  gauge(
    'volrep_split_brain',
    '1 while the last handshake found a split brain (both sides wrote apart)',
    () => (node().handshake?.decision === 'splitBrain' ? 1 : 0),
  );
}

/** volrep_role{role="primary"|"secondary"} 1: which role this daemon serves in. */
export function registerRoleMetric(metrics: Metrics, role: 'primary' | 'secondary'): void {
  const g = new Gauge({
    name: 'volrep_role',
    help: 'The role this daemon serves in (label role)',
    labelNames: ['role'],
    registers: [metrics.registry],
  });
  g.set({ role }, 1);
}
