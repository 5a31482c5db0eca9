/**
 * One error class for everything volrep refuses or fails at, each with a stable `code` (scripts
 * match on it) and an exit code from one table (the CLI prints one line and exits with it). No
 * I/O here: the sans-I/O core raises these too.
 */

/** Exit code for a mistake the user can fix (bad flag, wrong or missing file, refused input). */
export const EXIT_USAGE = 2;
/** Exit code for a failure at run time (an I/O error, a broken invariant). */
export const EXIT_RUNTIME = 1;

/** Every code volrep raises, with the exit code a command that stops on it returns. */
export const ERROR_EXIT_CODES = {
  /** A bad flag, range or call (the caller's mistake). */
  VOLREP_ERR_USAGE: EXIT_USAGE,
  /** A size that is not allowed (region, log, volume, window). */
  VOLREP_ERR_SIZE: EXIT_USAGE,
  VOLREP_ERR_NOT_FOUND: EXIT_USAGE,
  VOLREP_ERR_EXISTS: EXIT_USAGE,
  /** meta.json or another metadata file is unreadable, inconsistent or of the wrong role. */
  VOLREP_ERR_META: EXIT_USAGE,
  VOLREP_ERR_META_VERSION: EXIT_USAGE,
  /** A metadata file that must exist is missing: its state is unknown, never "clean" (H18). */
  VOLREP_ERR_META_MISSING: EXIT_USAGE,
  VOLREP_ERR_VOLUME_SIZE: EXIT_USAGE,
  /** A role change the node's state forbids (promote a primary, demote a secondary). */
  VOLREP_ERR_ROLE: EXIT_USAGE,
  /** Promote of a replica marked inconsistent, without --force. */
  VOLREP_ERR_INCONSISTENT: EXIT_USAGE,
  VOLREP_ERR_LOCKED: EXIT_USAGE,
  VOLREP_ERR_ADDRESS: EXIT_USAGE,
  VOLREP_ERR_ADDRESS_IN_USE: EXIT_USAGE,
  /** An engine configuration out of range. */
  VOLREP_ERR_CONFIG: EXIT_USAGE,
  VOLREP_ERR_LOG_VERSION: EXIT_USAGE,
  VOLREP_ERR_LOG_CORRUPT: EXIT_USAGE,
  VOLREP_ERR_LOG_SIZE: EXIT_USAGE,
  VOLREP_ERR_BITMAP_VERSION: EXIT_USAGE,
  VOLREP_ERR_BITMAP_CORRUPT: EXIT_USAGE,
  VOLREP_ERR_BITMAP_SIZE: EXIT_USAGE,
  /** A request the engine cannot take (out of range, too large). */
  VOLREP_ERR_REQUEST: EXIT_RUNTIME,
  /** The peer broke the replication protocol. */
  VOLREP_ERR_PROTOCOL: EXIT_RUNTIME,
  /** An event that the current state does not allow (a bug, or a late completion). */
  VOLREP_ERR_STATE: EXIT_RUNTIME,
  /** Reading or writing a file or device failed. */
  VOLREP_ERR_IO: EXIT_RUNTIME,
} as const;

export type ErrorCode = keyof typeof ERROR_EXIT_CODES;

export class VolrepError extends Error {
  readonly code: ErrorCode;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'VolrepError';
    this.code = code;
  }

  get exitCode(): number {
    return ERROR_EXIT_CODES[this.code];
  }
}

/** The errno code of a node system error, if it is one. */
export function errnoCode(err: unknown): string | undefined {
  if (typeof err === 'object' && err !== null && 'code' in err && typeof err.code === 'string') {
    return err.code;
  }
  return undefined;
}
