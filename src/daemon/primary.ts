/**
 * The primary daemon: opens and locks the volume, serves it over NBD and, if asked, over HTTP.
 */
import path from 'node:path';
import type { Logger } from 'pino';
import { NbdServer } from '../nbd/server.js';
import { formatHostPort, type HostPort } from '../util/address.js';
import { FileDevice } from '../volume/file-device.js';
import { Volume } from '../volume/volume.js';
import { startHttp } from './http.js';
import { listenError } from './listen-error.js';
import { Metrics } from './metrics.js';

export interface PrimaryOptions {
  volumePath: string;
  metaDir?: string;
  nbd: HostPort;
  exportName: string;
  http?: HostPort;
  readOnly?: boolean;
  logger: Logger;
}

export interface RunningPrimary {
  nbdAddress: string;
  httpAddress?: string;
  status(): PrimaryStatus;
  /** Graceful stop: stop accepting, finish in-flight requests, flush, release the volume. */
  close(): Promise<void>;
}

export interface PrimaryStatus {
  role: 'primary';
  volume: { path: string; id: string; size: number; regionSize: number };
  nbd: { address: string; export: string; connections: number };
}

export async function startPrimary(opts: PrimaryOptions): Promise<RunningPrimary> {
  const volume = await Volume.open(opts.volumePath, { metaDir: opts.metaDir, readOnly: opts.readOnly });
  const metrics = new Metrics();
  const device = new FileDevice(volume.fd, volume.size, opts.readOnly);
  const nbd = new NbdServer(device, { exportName: opts.exportName, logger: opts.logger, stats: metrics });
  let nbdAddress: string;
  try {
    const bound = await nbd.listen(opts.nbd.host, opts.nbd.port);
    nbdAddress = formatHostPort({ host: bound.address, port: bound.port });
  } catch (err) {
    await volume.close();
    throw listenError(err, 'NBD', opts.nbd);
  }

  const status = (): PrimaryStatus => ({
    role: 'primary',
    volume: {
      path: path.resolve(volume.path),
      id: volume.meta.volumeId,
      size: volume.size,
      regionSize: volume.meta.regionSize,
    },
    nbd: { address: nbdAddress, export: opts.exportName, connections: nbd.connectionCount },
  });

  let http: Awaited<ReturnType<typeof startHttp>> | undefined;
  if (opts.http) {
    try {
      http = await startHttp(opts.http.host, opts.http.port, status, metrics.registry, opts.logger);
    } catch (err) {
      await nbd.close();
      await volume.close();
      throw listenError(err, 'HTTP', opts.http);
    }
  }
  opts.logger.info(
    {
      volume: volume.path,
      nbd: nbdAddress,
      http: http && formatHostPort({ host: http.address.address, port: http.address.port }),
    },
    'primary serving',
  );

  let closing: Promise<void> | undefined;
  return {
    nbdAddress,
    httpAddress: http && formatHostPort({ host: http.address.address, port: http.address.port }),
    status,
    close() {
      closing ??= (async () => {
        await nbd.close();
        await http?.close();
        await new Promise<void>((resolve, reject) => device.flush((err) => (err ? reject(err) : resolve())));
        await volume.close();
        opts.logger.info('primary stopped');
      })();
      return closing;
    },
  };
}
