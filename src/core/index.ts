/** The replication engine core (sans-I/O): see engine.ts for the event/action contract. */
export {
  type Action,
  Engine,
  type EngineConfig,
  type EngineStats,
  logCapacityMin,
  type RecoveredState,
  type UpdateSource,
  type WriteKind,
  type WriteRequest,
} from './engine.js';
export { EngineError, type EngineErrorCode } from './errors.js';
export { IndicatorMap } from './indicator-map.js';
export type { LogRecord } from './records.js';
