/**
 * The secondary daemon: opens and locks the replica, listens for the primary's replication
 * stream, applies it in order, and serves status over HTTP if asked.
 */
import path from 'node:path';
import type { Logger } from 'pino';
import { Counter, Gauge } from 'prom-client';
import { Applier, type ReplicaState } from '../replication/applier.js';
import { SecondaryLink } from '../replication/secondary.js';
import { formatHostPort, type HostPort } from '../util/address.js';
import { VolrepError } from '../util/errors.js';
import { requireLoopback } from '../util/loopback.js';
import { FileDevice } from '../volume/file-device.js';
import { SlotFile } from '../volume/slot-file.js';
import { REPLICA_STATE_FILE, VolumeFile } from '../volume/volume.js';
import { startHttp } from './http.js';
import { listenError } from './listen-error.js';
import { Metrics } from './metrics.js';

export interface SecondaryOptions {
  volumePath: string;
  metaDir?: string;
  listen: HostPort;
  http?: HostPort;
  logger: Logger;
}

export interface SecondaryStatus {
  role: 'secondary';
  volume: { path: string; id: string; size: number; regionSize: number };
  listen: string;
  peer: { address: string | null; state: 'waiting' | 'connected' };
  lastAppliedUpdate: number;
  consistent: boolean;
}

export interface RunningSecondary {
  listenAddress: string;
  httpAddress?: string;
  status(): SecondaryStatus;
  close(): Promise<void>;
}

function validateState(v: unknown): ReplicaState | undefined {
  if (typeof v !== 'object' || v === null) return undefined;
  const s = v as Record<string, unknown>;
  if (
    typeof s.lastAppliedUpdate !== 'number' ||
    !Number.isSafeInteger(s.lastAppliedUpdate) ||
    s.lastAppliedUpdate < 0
  ) {
    return undefined;
  }
  if (typeof s.consistent !== 'boolean') return undefined;
  return { lastAppliedUpdate: s.lastAppliedUpdate, consistent: s.consistent };
}

export async function startSecondary(opts: SecondaryOptions): Promise<RunningSecondary> {
  requireLoopback(opts.listen.host, '--listen');
  const volume = await VolumeFile.open(opts.volumePath, { metaDir: opts.metaDir });
  if (volume.meta.role !== 'secondary') {
    await volume.close();
    throw new VolrepError(
      'VOLREP_ERR_META',
      `${opts.volumePath} was created as a primary; create the replica with 'volrep create --secondary-of <primary volume id>'`,
    );
  }
  const { slots, value } = await SlotFile.open(path.join(volume.metaDir, REPLICA_STATE_FILE), validateState);
  // A replica that never received anything holds unknown bytes: not consistent until a full sync.
  const initial = value ?? { lastAppliedUpdate: 0, consistent: false };
  const device = new FileDevice(volume.fd, volume.size);
  const applier = new Applier(device, slots, initial);
  const metrics = new Metrics();
  new Gauge({
    name: 'volrep_last_applied_update',
    help: 'Highest update id durable on the replica',
    registers: [metrics.registry],
    collect() {
      this.set(applier.state.lastAppliedUpdate);
    },
  });
  const acks = new Counter({
    name: 'volrep_acks_total',
    help: 'Acks sent to the primary',
    registers: [metrics.registry],
  });
  const link = new SecondaryLink({
    meta: volume.meta,
    applier,
    logger: opts.logger,
    onAckSent: () => acks.inc(),
  });
  let listenAddress: string;
  try {
    const bound = await link.listen(opts.listen.host, opts.listen.port);
    listenAddress = formatHostPort({ host: bound.address, port: bound.port });
  } catch (err) {
    await slots.close();
    await volume.close();
    throw listenError(err, 'replication', opts.listen);
  }
  const status = (): SecondaryStatus => {
    const state = applier.state;
    return {
      role: 'secondary',
      volume: {
        path: path.resolve(volume.path),
        id: volume.meta.volumeId,
        size: volume.size,
        regionSize: volume.meta.regionSize,
      },
      listen: listenAddress,
      peer: { address: link.peerAddress ?? null, state: link.peerState },
      lastAppliedUpdate: state.lastAppliedUpdate,
      consistent: state.consistent,
    };
  };
  let http: Awaited<ReturnType<typeof startHttp>> | undefined;
  if (opts.http) {
    try {
      http = await startHttp(opts.http.host, opts.http.port, status, metrics.registry, opts.logger);
    } catch (err) {
      await link.close();
      await slots.close();
      await volume.close();
      throw listenError(err, 'HTTP', opts.http);
    }
  }
  const httpAddress = http && formatHostPort({ host: http.address.address, port: http.address.port });
  opts.logger.info(
    { volume: volume.path, listen: listenAddress, http: httpAddress, ...initial },
    'secondary serving',
  );
  let closing: Promise<void> | undefined;
  return {
    listenAddress,
    httpAddress,
    status,
    close() {
      closing ??= (async () => {
        await link.close();
        await http?.close();
        await slots.close();
        await volume.close();
        opts.logger.info('secondary stopped');
      })();
      return closing;
    },
  };
}
