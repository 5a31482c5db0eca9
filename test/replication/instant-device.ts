import type { BlockDevice, Done } from '../../src/io/block-device.js';

/** A 1 MiB device whose reads and writes complete at once; `flush` says how its syncs complete. */
export function instantDevice(flush: (done: Done) => void): BlockDevice {
  return {
    size: 1 << 20,
    readOnly: false,
    read: (_o, _l, _b, _a, done: Done) => done(null),
    write: (_o, _d, _l, _f, done: Done) => done(null),
    writeZeroes: (_o, _l, _f, done: Done) => done(null),
    trim: (_o, _l, _f, done: Done) => done(null),
    flush,
  };
}
