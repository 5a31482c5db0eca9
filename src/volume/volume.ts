import { constants as fsc, promises as fsp } from 'node:fs';
import path from 'node:path';
import { errnoCode, VolrepError } from '../errors.js';
import { NodeBlockFile } from '../io/block-file.js';
import { SLOT_FILE_BYTES, SlotFile } from '../io/slot-file.js';
import { BitmapFile } from '../log/bitmap-file.js';
import { LogFile } from '../log/log-file.js';
import { ensureIdentity, IDENTITY_KEY_FILE, identityName } from '../security/identity.js';
import { initialPairState } from '../shell/primary-node.js';
import { INITIAL_REPLICA_STATE } from '../shell/secondary-node.js';
import { formatSize, isPowerOfTwo } from '../util/size.js';
import { type BornZeroMark, takeBornZeroMark } from './born-zero.js';
import { VolumeLock } from './lock.js';
import {
  META_FILE,
  type Meta,
  newMeta,
  REGION_SIZE_MAX,
  REGION_SIZE_MIN,
  type Role,
  readMeta,
  syncDirectory,
  writeMeta,
} from './meta.js';

export const DEFAULT_REGION_SIZE = 64 * 1024;
export const DEFAULT_LOG_SIZE = 64 * 1024 * 1024;
export const LOG_FILE = 'log';
export const BITMAP_FILE = 'bitmap';
/** The secondary's durable record of what it has applied (two checksummed slots). */
export const REPLICA_STATE_FILE = 'replica-state';
/** The primary's record of the pair's history (two checksummed slots). */
export const PAIR_STATE_FILE = 'pair-state';
/** Room for a few of the largest transaction records and the resync reserve (see logCapacityMin). */
export const LOG_SIZE_MIN = 64 * 1024;

/** The default metadata directory sits beside the volume: `PATH.volrep/`. */
export function defaultMetaDir(volumePath: string): string {
  return `${volumePath}.volrep`;
}

/** Size in bytes of a regular file or block device. */
export async function deviceSize(file: string): Promise<number> {
  const stat = await fsp.stat(file);
  if (stat.isFile()) return stat.size;
  if (stat.isBlockDevice()) {
    // node has no BLKGETSIZE64; the kernel publishes the size in 512-byte sectors.
    const major = Math.floor(stat.rdev / 256);
    const minor = stat.rdev % 256;
    const sectors = await fsp.readFile(`/sys/dev/block/${major}:${minor}/size`, 'utf8');
    return Number.parseInt(sectors, 10) * 512;
  }
  throw new VolrepError('VOLREP_ERR_VOLUME_SIZE', `${file} is neither a regular file nor a block device`);
}

export interface CreateOptions {
  volumePath: string;
  size: number;
  regionSize?: number;
  logSize?: number;
  metaDir?: string;
  force?: boolean;
  role?: Role;
  volumeId?: string;
}

/**
 * Creates (sparse) or adopts the volume and writes a fresh metadata directory. Refuses to replace
 * existing metadata unless `force`, and refuses an existing volume whose size differs.
 */
export async function createVolume(opts: CreateOptions): Promise<Meta> {
  const regionSize = opts.regionSize ?? DEFAULT_REGION_SIZE;
  const logSize = opts.logSize ?? DEFAULT_LOG_SIZE;
  const metaDir = opts.metaDir ?? defaultMetaDir(opts.volumePath);
  if (!isPowerOfTwo(regionSize) || regionSize < REGION_SIZE_MIN || regionSize > REGION_SIZE_MAX) {
    throw new VolrepError(
      'VOLREP_ERR_SIZE',
      `invalid --region-size ${regionSize}: must be a power of two from 4K to 16M`,
    );
  }
  if (opts.size <= 0 || opts.size % 512 !== 0) {
    throw new VolrepError(
      'VOLREP_ERR_SIZE',
      `invalid --size ${opts.size}: must be a positive multiple of 512`,
    );
  }
  if (logSize < LOG_SIZE_MIN) {
    throw new VolrepError(
      'VOLREP_ERR_SIZE',
      `invalid --log-size ${logSize}: must be at least ${formatSize(LOG_SIZE_MIN)}`,
    );
  }
  // Any metadata file left (say meta.json was lost but the log survived) is metadata to replace.
  const existing: string[] = [];
  for (const name of [
    META_FILE,
    LOG_FILE,
    BITMAP_FILE,
    PAIR_STATE_FILE,
    REPLICA_STATE_FILE,
    IDENTITY_KEY_FILE,
  ]) {
    if (
      await fsp.stat(path.join(metaDir, name)).then(
        () => true,
        () => false,
      )
    )
      existing.push(name);
  }
  const existingMeta = existing.length > 0;
  if (existingMeta && !opts.force) {
    throw new VolrepError(
      'VOLREP_ERR_EXISTS',
      `${metaDir} already holds volrep metadata (${existing.join(', ')}); pass --force to replace it (the replica will need a full sync)`,
    );
  }

  let volumeExists = true;
  try {
    await fsp.stat(opts.volumePath);
  } catch (err) {
    if (errnoCode(err) !== 'ENOENT') throw err;
    volumeExists = false;
  }
  if (volumeExists) {
    const actual = await deviceSize(opts.volumePath);
    if (actual !== opts.size) {
      throw new VolrepError(
        'VOLREP_ERR_VOLUME_SIZE',
        `${opts.volumePath} exists with size ${actual} bytes, not ${opts.size}; refusing to adopt it`,
      );
    }
  } else {
    try {
      const handle = await fsp.open(opts.volumePath, fsc.O_CREAT | fsc.O_EXCL | fsc.O_WRONLY, 0o644);
      try {
        await handle.truncate(opts.size);
        await handle.sync();
      } finally {
        await handle.close();
      }
    } catch (err) {
      if (errnoCode(err) === 'ENOENT') {
        throw new VolrepError(
          'VOLREP_ERR_NOT_FOUND',
          `cannot create ${opts.volumePath}: directory does not exist`,
        );
      }
      throw err;
    }
  }

  // Private: it holds the node's key, and what says which regions differ.
  await fsp.mkdir(metaDir, { recursive: true, mode: 0o700 });
  // Replacing metadata must not race a daemon using it, and must not keep the old volume's
  // history: a replica re-created with --force has applied nothing and is not consistent.
  const lock = existingMeta ? await VolumeLock.acquire(metaDir, opts.volumePath) : undefined;
  try {
    const meta = newMeta({ size: opts.size, regionSize, logSize, role: opts.role, volumeId: opts.volumeId });
    // The node's identity for the replication link, before anything is replaced: a kept one that
    // is unusable (a key readable by others, a missing half) refuses with the old metadata intact.
    // A side re-created with --force keeps the identity it had: its peer pinned that fingerprint
    // and keeps serving meanwhile, so it should not need a restart to accept the re-created side
    // (remove identity.key and identity.crt for a new one).
    await ensureIdentity(metaDir, identityName(meta.role, meta.volumeId));
    for (const stale of [REPLICA_STATE_FILE, PAIR_STATE_FILE])
      await fsp.rm(path.join(metaDir, stale), { force: true });
    // A volume file made here holds only zeros: the pair's first sync sends only what is written.
    return await writeMetadata(meta, metaDir, volumeExists ? undefined : takeBornZeroMark(opts.volumePath));
  } finally {
    await lock?.release();
  }
}

async function writeMetadata(meta: Meta, metaDir: string, bornZero?: BornZeroMark): Promise<Meta> {
  // The log and bitmap get their full size now, formatted (empty log, all-clean bitmap), so a
  // running daemon never runs out of space for them; the role's state file gets its first
  // record (a file missing later is refused, never read as "clean"). meta.json goes last: it
  // marks a complete set.
  await formatMetadataFiles(metaDir, meta.size, meta.regionSize, meta.logSize);
  if (meta.role === 'primary')
    await formatSlotFile(path.join(metaDir, PAIR_STATE_FILE), initialPairState(bornZero));
  else
    await formatSlotFile(path.join(metaDir, REPLICA_STATE_FILE), {
      ...INITIAL_REPLICA_STATE,
      ...(bornZero && { bornZero }),
    });
  await syncDirectory(metaDir);
  await writeMeta(metaDir, meta);
  return meta;
}

async function formatMetadataFiles(
  metaDir: string,
  size: number,
  regionSize: number,
  logSize: number,
): Promise<void> {
  const log = await NodeBlockFile.create(path.join(metaDir, LOG_FILE), logSize);
  try {
    await LogFile.format(log);
  } finally {
    await log.close();
  }
  const regionCount = Math.ceil(size / regionSize);
  const bitmap = await NodeBlockFile.create(
    path.join(metaDir, BITMAP_FILE),
    BitmapFile.fileBytes(regionCount),
  );
  try {
    await BitmapFile.format(bitmap, regionCount);
  } finally {
    await bitmap.close();
  }
  await syncDirectory(metaDir);
}

export async function formatSlotFile(file: string, value: unknown): Promise<void> {
  const f = await NodeBlockFile.create(file, SLOT_FILE_BYTES);
  try {
    await SlotFile.format(f, value);
  } finally {
    await f.close();
  }
}

/**
 * Opens a metadata file that must exist. A missing one is refused with what it held and what
 * to do: volrep never reads "no file" as "nothing dirty" or "nothing applied" (H18).
 */
export async function openMetadataFile(metaDir: string, name: string, what: string): Promise<NodeBlockFile> {
  const file = path.join(metaDir, name);
  try {
    return await NodeBlockFile.open(file);
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') {
      throw new VolrepError(
        'VOLREP_ERR_META_MISSING',
        `${file} is missing (${what}); volrep will not guess its content. Restore it, or re-create this side with 'volrep create --force' and let it sync in full`,
      );
    }
    throw new VolrepError('VOLREP_ERR_META', `${file}: ${(err as Error).message}`);
  }
}

/** An open, locked volume: the file handle for data and the metadata that describes it. */
export class VolumeFile {
  private constructor(
    readonly path: string,
    readonly metaDir: string,
    readonly meta: Meta,
    readonly fd: number,
    private readonly handle: fsp.FileHandle,
    private readonly lock: VolumeLock,
  ) {}

  static async open(
    volumePath: string,
    opts: { metaDir?: string; readOnly?: boolean } = {},
  ): Promise<VolumeFile> {
    const metaDir = opts.metaDir ?? defaultMetaDir(volumePath);
    const meta = await readMeta(metaDir);
    let actual: number;
    try {
      actual = await deviceSize(volumePath);
    } catch (err) {
      if (err instanceof VolrepError) throw err;
      if (errnoCode(err) === 'ENOENT')
        throw new VolrepError('VOLREP_ERR_NOT_FOUND', `volume ${volumePath} not found`);
      throw err;
    }
    if (actual !== meta.size) {
      throw new VolrepError(
        'VOLREP_ERR_VOLUME_SIZE',
        `volume ${volumePath} is ${actual} bytes but its metadata says ${meta.size}; refusing to serve it`,
      );
    }
    const lock = await VolumeLock.acquire(metaDir, volumePath);
    try {
      const handle = await fsp.open(volumePath, opts.readOnly ? 'r' : 'r+');
      return new VolumeFile(volumePath, metaDir, meta, handle.fd, handle, lock);
    } catch (err) {
      await lock.release();
      throw err;
    }
  }

  get size(): number {
    return this.meta.size;
  }

  async close(): Promise<void> {
    await this.handle.close();
    await this.lock.release();
  }
}

/** Names the metadata directory in a metadata file's refusal (the file's own message names the file). */
export async function withMetaDirName<T>(metaDir: string, open: () => Promise<T>): Promise<T> {
  try {
    return await open();
  } catch (err) {
    if (err instanceof VolrepError && /^VOLREP_ERR_(LOG_|BITMAP_|META)/.test(err.code)) {
      throw new VolrepError(err.code, `${metaDir}: ${err.message}`, { cause: err });
    }
    throw err;
  }
}
