/** Log file, bitmap file, recovery and the file-backed driver of the engine core. */
export { BitmapFile, type PersistedBitmap } from './bitmap-file.js';
export { type BlockFile, NodeBlockFile } from './block-file.js';
export { type DriverWrite, ReplicationDriver, type UpdateSink, type VolumeIo } from './driver.js';
export { LogFile, type LogScan } from './log-file.js';
export { type Recovered, type RecoveryReport, recover } from './recovery.js';
export { SimDisk, type TearMode } from './sim-disk.js';
