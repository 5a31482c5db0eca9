/**
 * volrep as a library: the volume with the replication engine in its write path, and the daemons
 * for programs that embed them.
 */
export {
  type PrimaryOptions,
  type PrimaryStatus,
  type RunningPrimary,
  startPrimary,
} from './daemon/primary.js';
export {
  type RunningSecondary,
  type SecondaryOptions,
  type SecondaryStatus,
  startSecondary,
} from './daemon/secondary.js';
export { ERROR_EXIT_CODES, type ErrorCode, EXIT_RUNTIME, EXIT_USAGE, VolrepError } from './errors.js';
export { NbdClient } from './nbd/client.js';
export { formatSize, parseSize } from './util/size.js';
export type { Meta } from './volume/meta.js';
export { Transaction, Volume, type VolumeOptions, type VolumeStatus } from './volume/replicated.js';
export { type CreateOptions, createVolume } from './volume/volume.js';
