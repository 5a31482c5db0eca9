/**
 * Errors raised by the replication engine and its log and bitmap files. Each has a stable
 * `code` so that the CLI prints one line and scripts can match on it. (The codes are kept
 * here rather than in src/util/errors.ts so that src/core stays free of other folders.)
 */
export type EngineErrorCode =
  | 'VOLREP_ERR_CONFIG'
  | 'VOLREP_ERR_REQUEST'
  | 'VOLREP_ERR_PROTOCOL'
  | 'VOLREP_ERR_STATE'
  | 'VOLREP_ERR_LOG_VERSION'
  | 'VOLREP_ERR_LOG_CORRUPT'
  | 'VOLREP_ERR_LOG_SIZE'
  | 'VOLREP_ERR_BITMAP_VERSION'
  | 'VOLREP_ERR_BITMAP_CORRUPT'
  | 'VOLREP_ERR_BITMAP_SIZE';

export class EngineError extends Error {
  readonly code: EngineErrorCode;
  constructor(code: EngineErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'VolrepError';
    this.code = code;
  }
}
