import pino, { type Logger } from 'pino';

/** JSON logs on stderr (stdout stays free for command output); level from VOLREP_LOG_LEVEL. */
export function createLogger(name: string): Logger {
  return pino(
    { name, level: process.env.VOLREP_LOG_LEVEL ?? 'info' },
    pino.destination({ fd: 2, sync: true }),
  );
}

/** Repeats of one message within this time are counted and folded into the next line. */
export const REPEAT_LOG_INTERVAL_MS = 30_000;

/**
 * A warning that can repeat at the reconnect rate (a peer that keeps refusing this node's
 * certificate): the first one is logged, later ones with the same reason at most once per
 * REPEAT_LOG_INTERVAL_MS, saying how many were left out.
 */
export function repeatLimitedWarn(
  logger: Logger,
  message: string,
  now: () => number = Date.now,
): (fields: { reason: string } & Record<string, unknown>) => void {
  let lastReason: string | undefined;
  let lastAt = 0;
  let leftOut = 0;
  return (fields) => {
    const at = now();
    if (fields.reason === lastReason && at - lastAt < REPEAT_LOG_INTERVAL_MS) {
      leftOut += 1;
      return;
    }
    logger.warn(leftOut > 0 ? { ...fields, repeatedSinceLastLine: leftOut } : fields, message);
    lastReason = fields.reason;
    lastAt = at;
    leftOut = 0;
  };
}
