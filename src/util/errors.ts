/**
 * One error class for everything volrep refuses, each with a stable code so that
 * the CLI prints one clear line and scripts can match on it.
 */
export type ErrorCode =
  | 'VOLREP_ERR_USAGE'
  | 'VOLREP_ERR_SIZE'
  | 'VOLREP_ERR_NOT_FOUND'
  | 'VOLREP_ERR_EXISTS'
  | 'VOLREP_ERR_META'
  | 'VOLREP_ERR_META_VERSION'
  | 'VOLREP_ERR_VOLUME_SIZE'
  | 'VOLREP_ERR_LOCKED'
  | 'VOLREP_ERR_ADDRESS'
  | 'VOLREP_ERR_ADDRESS_IN_USE'
  | 'VOLREP_ERR_IO';

/** Exit code for a mistake the user can fix (bad flag, wrong file), as opposed to a runtime failure. */
export const EXIT_USAGE = 2;
export const EXIT_RUNTIME = 1;

const USAGE_CODES: ReadonlySet<ErrorCode> = new Set<ErrorCode>([
  'VOLREP_ERR_USAGE',
  'VOLREP_ERR_SIZE',
  'VOLREP_ERR_NOT_FOUND',
  'VOLREP_ERR_EXISTS',
  'VOLREP_ERR_META',
  'VOLREP_ERR_META_VERSION',
  'VOLREP_ERR_VOLUME_SIZE',
  'VOLREP_ERR_LOCKED',
  'VOLREP_ERR_ADDRESS',
  'VOLREP_ERR_ADDRESS_IN_USE',
]);

export class VolrepError extends Error {
  readonly code: ErrorCode;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'VolrepError';
    this.code = code;
  }

  get exitCode(): number {
    return USAGE_CODES.has(this.code) ? EXIT_USAGE : EXIT_RUNTIME;
  }
}

/** The errno code of a node system error, if it is one. */
export function errnoCode(err: unknown): string | undefined {
  if (typeof err === 'object' && err !== null && 'code' in err && typeof err.code === 'string') {
    return err.code;
  }
  return undefined;
}
