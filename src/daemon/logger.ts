import pino, { type Logger } from 'pino';

/** JSON logs on stderr (stdout stays free for command output); level from VOLREP_LOG_LEVEL. */
export function createLogger(name: string): Logger {
  return pino(
    { name, level: process.env.VOLREP_LOG_LEVEL ?? 'info' },
    pino.destination({ fd: 2, sync: true }),
  );
}
