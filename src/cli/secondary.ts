import { createLogger } from '../daemon/logger.js';
import { startSecondary } from '../daemon/secondary.js';
import { parseHostPort } from '../util/address.js';
import { type LinkFlags, linkOptions } from './link-flags.js';
import { StopSignals } from './primary.js';

export interface SecondaryFlags {
  volume: string;
  meta?: string;
  listen: string;
  http?: string;
  allowPeer: string[];
  tlsCa?: string;
  tlsCert?: string;
  tlsKey?: string;
  insecurePlaintext: boolean;
  discardLocalChanges: boolean;
}

export async function runSecondary(flags: SecondaryFlags): Promise<void> {
  const listen = parseHostPort(flags.listen, '--listen');
  const http = flags.http === undefined ? undefined : parseHostPort(flags.http, '--http');
  const linkFlags: LinkFlags = { ...flags, fingerprints: flags.allowPeer };
  const link = await linkOptions(linkFlags, 'secondary');
  const logger = createLogger('volrep-secondary');
  const signals = new StopSignals(logger);
  const secondary = await startSecondary({
    onFailure: (err) => signals.fail(err),
    volumePath: flags.volume,
    metaDir: flags.meta,
    discardLocalChanges: flags.discardLocalChanges,
    listen,
    http,
    link,
    logger,
  });
  await signals.stopWith(() => secondary.close());
}
