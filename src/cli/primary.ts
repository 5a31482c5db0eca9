import { createLogger } from '../daemon/logger.js';
import { startPrimary } from '../daemon/primary.js';
import { parseHostPort } from '../util/address.js';

export interface PrimaryFlags {
  volume: string;
  meta?: string;
  nbd: string;
  export: string;
  http?: string;
  readOnly: boolean;
}

/** Runs until SIGINT/SIGTERM, then stops gracefully; a second signal exits at once. */
export async function runPrimary(flags: PrimaryFlags): Promise<void> {
  const nbd = parseHostPort(flags.nbd, '--nbd');
  const http = flags.http === undefined ? undefined : parseHostPort(flags.http, '--http');
  const logger = createLogger('volrep-primary');
  const primary = await startPrimary({
    volumePath: flags.volume,
    metaDir: flags.meta,
    nbd,
    exportName: flags.export,
    http,
    readOnly: flags.readOnly,
    logger,
  });
  await waitForStopSignal(logger, () => primary.close());
}

export function waitForStopSignal(
  logger: { info: (m: string) => void },
  stop: () => Promise<void>,
): Promise<void> {
  return new Promise((resolve, reject) => {
    let stopping = false;
    const onSignal = (signal: NodeJS.Signals) => {
      if (stopping) {
        logger.info(`second ${signal}: exiting now`);
        process.exit(1);
      }
      stopping = true;
      logger.info(`${signal}: stopping`);
      stop().then(() => {
        process.off('SIGINT', onSignal);
        process.off('SIGTERM', onSignal);
        resolve();
      }, reject);
    };
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
  });
}
