/**
 * The secondary daemon: opens and locks the replica, listens for the primary's replication
 * stream (TLS with the peers it trusts, or plaintext on loopback when asked), hands each
 * authenticated connection to the node (src/shell/secondary-node.ts), and serves status over
 * HTTP if asked.
 */
import type net from 'node:net';
import path from 'node:path';
import type { Logger } from 'pino';
import { Counter, Gauge } from 'prom-client';
import type { NodeBlockFile } from '../io/block-file.js';
import { systemClock } from '../io/clock.js';
import { type LinkSecurity, replicationListener } from '../io/tls.js';
import { encodeRefusalFrame } from '../replication/messages.js';
import { identityName } from '../security/identity.js';
import { SecondaryNode } from '../shell/secondary-node.js';
import { formatHostPort, type HostPort } from '../util/address.js';
import { stillBornZero } from '../volume/born-zero.js';
import { FileDevice } from '../volume/file-device.js';
import { becomeSecondary, discardLocalChanges } from '../volume/roles.js';
import {
  BITMAP_FILE,
  LOG_FILE,
  openMetadataFile,
  REPLICA_STATE_FILE,
  VolumeFile,
  withMetaDirName,
} from '../volume/volume.js';
import { type GenerationStatus, generationStatus } from './handshake-status.js';
import { startHttp } from './http.js';
import { type LinkSecurityOptions, resolveLinkSecurity } from './link-security.js';
import { listenError } from './listen-error.js';
import { repeatLimitedWarn } from './logger.js';
import { Metrics } from './metrics.js';
import { registerRoleMetric } from './primary.js';

/**
 * Replica writes up to this size run on the event loop; larger ones (a resync's 64 KiB regions,
 * large client writes) go to the threadpool, where the applier runs a few side by side and joins
 * the adjacent ones queued meanwhile (src/replication/applier.ts): a full sync writes 1 MiB at a
 * time off the event loop instead of 64 KiB on it.
 */
export const REPLICA_SYNC_WRITE_BYTES_MAX = 16 * 1024;

export interface SecondaryOptions {
  volumePath: string;
  metaDir?: string;
  /** Give up the writes this side made while apart (its generation returns to the shared one). */
  discardLocalChanges?: boolean;
  listen: HostPort;
  http?: HostPort;
  /** Whom to accept over TLS (the default), or plaintext on loopback. */
  link: LinkSecurityOptions;
  logger: Logger;
  /** The replica failed (an I/O error): the daemon should stop and exit non-zero. */
  onFailure?: (err: Error) => void;
}

export interface SecondaryStatus {
  role: 'secondary';
  volume: { path: string; id: string; size: number; regionSize: number };
  listen: string;
  /** This node's certificate fingerprint and whether the link is TLS. */
  tls: boolean;
  fingerprint: string | null;
  peer: { address: string | null; state: 'waiting' | 'connected'; tls: boolean; fingerprint: string | null };
  lastAppliedUpdate: number;
  consistent: boolean;
  ownDirtyRegions: number;
}

export type SecondaryFullStatus = SecondaryStatus & GenerationStatus;

export interface RunningSecondary {
  listenAddress: string;
  httpAddress?: string;
  /** This node's certificate fingerprint (null in plaintext). */
  fingerprint: string | null;
  status(): SecondaryFullStatus;
  close(): Promise<void>;
}

export async function startSecondary(opts: SecondaryOptions): Promise<RunningSecondary> {
  const first = await VolumeFile.open(opts.volumePath, { metaDir: opts.metaDir });
  const wasPrimary = first.meta.role === 'primary';
  await first.close();
  if (wasPrimary) {
    // An old primary started as a secondary without 'volrep demote': it keeps what it wrote
    // apart, so a peer that also wrote meets it as a split brain (never overwritten silently).
    const change = await becomeSecondary(opts.volumePath, { metaDir: opts.metaDir, giveUp: false });
    opts.logger.warn(
      { generation: change.after.current, base: change.after.base },
      "this volume was a primary and was not demoted: it is a secondary now and keeps the writes it made while apart ('volrep demote' gives them up)",
    );
  }
  const volume = await VolumeFile.open(opts.volumePath, { metaDir: opts.metaDir });
  let stateFile: NodeBlockFile | undefined;
  const metaFiles: NodeBlockFile[] = [];
  let node: SecondaryNode;
  let security: LinkSecurity | undefined;
  try {
    security = await resolveLinkSecurity(
      opts.link,
      volume.metaDir,
      identityName('secondary', volume.meta.volumeId),
      opts.listen,
      '--listen',
      opts.logger,
    );
    stateFile = await openMetadataFile(
      volume.metaDir,
      REPLICA_STATE_FILE,
      'the replica state says which updates are durable here and whether the replica is consistent',
    );
    if (opts.discardLocalChanges) {
      const [before, after] = await discardLocalChanges(stateFile, volume.meta.volumeId);
      if (before === after)
        opts.logger.warn(
          { generation: before.current },
          "--discard-local-changes: this side has no history of its own to give up; if the primary still reports a split brain, re-create this side ('volrep create --force --secondary-of <volume id>') for a full sync",
        );
      else
        opts.logger.warn(
          { discarded: before.current, generation: after.current },
          '--discard-local-changes: the writes this side made apart are given up; the primary overwrites them',
        );
    }
    const log = await openMetadataFile(
      volume.metaDir,
      LOG_FILE,
      'the transaction log says which regions this side wrote',
    );
    metaFiles.push(log);
    const bitmap = await openMetadataFile(
      volume.metaDir,
      BITMAP_FILE,
      'the bitmap says which regions this side may hold differently',
    );
    metaFiles.push(bitmap);
    const state = stateFile;
    node = await withMetaDirName(volume.metaDir, () =>
      SecondaryNode.open(
        {
          replica: new FileDevice(volume.fd, volume.size, false, REPLICA_SYNC_WRITE_BYTES_MAX),
          state,
          log,
          bitmap,
        },
        { volumeId: volume.meta.volumeId, size: volume.size, regionSize: volume.meta.regionSize },
        {
          clock: systemClock,
          logger: opts.logger,
          onFailure: opts.onFailure,
          replicaAsCreated: (mark) => stillBornZero(volume.fd, mark),
        },
      ),
    );
  } catch (err) {
    await stateFile?.close();
    for (const f of metaFiles) await f.close();
    await volume.close();
    throw err;
  }
  const metrics = new Metrics();
  new Gauge({
    name: 'volrep_last_applied_update',
    help: 'Highest update id durable on the replica',
    registers: [metrics.registry],
    collect() {
      this.set(node.status().lastAppliedUpdate);
    },
  });
  new Counter({
    name: 'volrep_acks_total',
    help: 'Acks sent to the primary',
    registers: [metrics.registry],
    collect() {
      this.reset();
      this.inc(node.counters.acks);
    },
  });
  new Gauge({
    name: 'volrep_split_brain',
    help: '1 while the last handshake found a split brain (both sides wrote apart)',
    registers: [metrics.registry],
    collect() {
      this.set(node.status().handshake?.decision === 'splitBrain' ? 1 : 0);
    },
  });
  registerRoleMetric(metrics, 'secondary');
  const authFailures = new Counter({
    name: 'volrep_peer_auth_failures_total',
    help: 'Replication connections refused: unknown, wrong or expired certificate, no TLS, a handshake that failed or took too long',
    registers: [metrics.registry],
  });
  // A primary whose certificate is refused redials up to four times a second.
  const warnRefused = repeatLimitedWarn(opts.logger, 'replication connection refused');
  const server: net.Server = replicationListener({
    security,
    onRefused: (f) => {
      authFailures.inc();
      warnRefused({ peer: f.remote, fingerprint: f.fingerprint, reason: f.reason });
    },
    onConnection: (connection) => node.accept(connection),
    refusal: encodeRefusalFrame,
  });
  const closeStorage = async () => {
    await node.close();
    await stateFile.close();
    for (const f of metaFiles) await f.close();
    await volume.close();
  };
  let listenAddress: string;
  try {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen({ host: opts.listen.host, port: opts.listen.port, exclusive: true }, () => {
        server.off('error', reject);
        server.on('error', (err) => opts.logger.error({ err }, 'replication listener error'));
        resolve();
      });
    });
    const bound = server.address() as net.AddressInfo;
    listenAddress = formatHostPort({ host: bound.address, port: bound.port });
  } catch (err) {
    await closeStorage();
    throw listenError(err, 'replication', opts.listen);
  }
  const fingerprint = security?.identity.fingerprint ?? null;
  const status = (): SecondaryFullStatus => {
    const { generations, handshake, ...s } = node.status();
    return {
      ...generationStatus(generations, handshake, {
        side: 'secondary',
        connected: s.peer.state === 'connected',
        consistent: s.consistent,
      }),
      role: 'secondary',
      volume: {
        path: path.resolve(volume.path),
        id: volume.meta.volumeId,
        size: volume.size,
        regionSize: volume.meta.regionSize,
      },
      listen: listenAddress,
      tls: security !== undefined,
      fingerprint,
      ...s,
    };
  };
  let http: Awaited<ReturnType<typeof startHttp>> | undefined;
  if (opts.http) {
    try {
      http = await startHttp(opts.http.host, opts.http.port, status, metrics.registry, opts.logger, {
        '/dirty': () => ({ regionSize: volume.meta.regionSize, ranges: node.ownDirtyRanges() }),
      });
    } catch (err) {
      await new Promise<void>((resolve) => server.close(() => resolve()));
      await closeStorage();
      throw listenError(err, 'HTTP', opts.http);
    }
  }
  const httpAddress = http && formatHostPort({ host: http.address.address, port: http.address.port });
  opts.logger.info(
    {
      volume: volume.path,
      listen: listenAddress,
      http: httpAddress,
      tls: security !== undefined,
      fingerprint,
      lastAppliedUpdate: node.status().lastAppliedUpdate,
      consistent: node.status().consistent,
      generation: node.status().generations.current,
      ownDirtyRegions: node.status().ownDirtyRegions,
    },
    'secondary serving',
  );
  if (security === undefined)
    opts.logger.warn(
      'replication link in plaintext (--insecure-plaintext): no authentication, no encryption',
    );
  let closing: Promise<void> | undefined;
  return {
    listenAddress,
    httpAddress,
    fingerprint,
    status,
    close() {
      closing ??= (async () => {
        const closed = new Promise<void>((resolve) => server.close(() => resolve()));
        await closeStorage();
        await closed;
        await http?.close();
        opts.logger.info('secondary stopped');
      })();
      return closing;
    },
  };
}
