import { createLogger } from '../daemon/logger.js';
import { startPrimary } from '../daemon/primary.js';
import { VolrepError } from '../errors.js';
import { parseHostPort } from '../util/address.js';
import { parseDuration, parseSize } from '../util/size.js';
import { linkOptions } from './link-flags.js';

export interface PrimaryFlags {
  volume: string;
  meta?: string;
  nbd: string;
  export: string;
  http?: string;
  readOnly: boolean;
  activityWindow: string;
  peer?: string;
  mode: 'async' | 'sync';
  ackTimeout: string;
  window: string;
  assumeClean: boolean;
  peerFingerprint: string[];
  nbdTls: 'off' | 'on' | 'require';
  nbdTlsCert?: string;
  nbdTlsKey?: string;
  nbdTlsCa?: string;
  nbdInsecure: boolean;
  tlsCa?: string;
  tlsCert?: string;
  tlsKey?: string;
  insecurePlaintext: boolean;
  listen?: string;
}

/** Runs until SIGINT/SIGTERM, then stops gracefully; a second signal exits at once. */
export async function runPrimary(flags: PrimaryFlags): Promise<void> {
  const nbd = parseHostPort(flags.nbd, '--nbd');
  const http = flags.http === undefined ? undefined : parseHostPort(flags.http, '--http');
  const activityWindowBytes = parseSize(flags.activityWindow, '--activity-window');
  const peer = flags.peer === undefined ? undefined : parseHostPort(flags.peer, '--peer');
  const listen = flags.listen === undefined ? undefined : parseHostPort(flags.listen, '--listen');
  if (listen && !peer)
    throw new VolrepError(
      'VOLREP_ERR_USAGE',
      '--listen answers the peer: it needs --peer (and its trust flags)',
    );
  const ackTimeoutMs = parseDuration(flags.ackTimeout, '--ack-timeout');
  const windowBytes = parseSize(flags.window, '--window');
  if (windowBytes < 64 * 1024) throw new VolrepError('VOLREP_ERR_SIZE', '--window must be at least 64K');
  const link = peer
    ? await linkOptions({ ...flags, fingerprints: flags.peerFingerprint }, 'primary')
    : undefined;
  if (
    !peer &&
    (flags.peerFingerprint.length > 0 || flags.tlsCa || flags.tlsCert || flags.insecurePlaintext)
  ) {
    throw new VolrepError(
      'VOLREP_ERR_USAGE',
      'the replication link flags (--peer-fingerprint, --tls-*, --insecure-plaintext) need --peer',
    );
  }
  if (flags.nbdTls !== 'off' && (flags.nbdTlsCert === undefined || flags.nbdTlsKey === undefined)) {
    throw new VolrepError(
      'VOLREP_ERR_USAGE',
      `--nbd-tls ${flags.nbdTls} needs --nbd-tls-cert and --nbd-tls-key`,
    );
  }
  if (flags.nbdTls === 'off' && (flags.nbdTlsCert || flags.nbdTlsKey || flags.nbdTlsCa)) {
    throw new VolrepError(
      'VOLREP_ERR_USAGE',
      '--nbd-tls-cert, --nbd-tls-key and --nbd-tls-ca need --nbd-tls on or require',
    );
  }
  const nbdTls =
    flags.nbdTls === 'off'
      ? undefined
      : {
          mode: flags.nbdTls,
          certFile: flags.nbdTlsCert!,
          keyFile: flags.nbdTlsKey!,
          caFile: flags.nbdTlsCa,
        };
  const logger = createLogger('volrep-primary');
  const signals = new StopSignals(logger);
  const primary = await startPrimary({
    onFailure: (err) => signals.fail(err),
    activityWindowBytes,
    peer,
    listen,
    link,
    nbdTls,
    nbdInsecure: flags.nbdInsecure,
    mode: flags.mode,
    ackTimeoutMs,
    windowBytes,
    assumeClean: flags.assumeClean,
    volumePath: flags.volume,
    metaDir: flags.meta,
    nbd,
    exportName: flags.export,
    http,
    readOnly: flags.readOnly,
    logger,
  });
  await signals.stopWith(() => primary.close());
}

/**
 * SIGINT/SIGTERM handling, installed before the daemon starts so that a signal arriving during
 * startup (or right after the ready line) still means a graceful stop, never node's default kill.
 * A fatal failure of the daemon (an I/O error) stops it the same way, then fails the command.
 */
export class StopSignals {
  private requested: NodeJS.Signals | undefined;
  private failure: Error | undefined;
  private wake: (() => void) | undefined;
  private readonly onSignal = (signal: NodeJS.Signals) => {
    if (this.requested) {
      this.logger.info(`second ${signal}: exiting now`);
      process.exit(1);
    }
    this.requested = signal;
    this.logger.info(`${signal}: stopping`);
    this.wake?.();
  };

  constructor(private readonly logger: { info: (m: string) => void }) {
    process.on('SIGINT', this.onSignal);
    process.on('SIGTERM', this.onSignal);
  }

  /** The daemon cannot go on: stop it, then make the command fail with this error. */
  fail(err: Error): void {
    this.failure ??= err;
    this.wake?.();
  }

  /** Waits for a signal or a failure (or uses one that already came), then runs `stop`. */
  async stopWith(stop: () => Promise<void>): Promise<void> {
    if (!this.requested && !this.failure) await new Promise<void>((resolve) => (this.wake = resolve));
    await stop().catch((err: unknown) => {
      if (!this.failure) throw err;
    });
    process.off('SIGINT', this.onSignal);
    process.off('SIGTERM', this.onSignal);
    if (this.failure) throw this.failure;
  }
}
