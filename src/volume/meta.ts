import { randomUUID } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { errnoCode, VolrepError } from '../errors.js';
import { isPowerOfTwo } from '../util/size.js';

/** The meta.json format this build writes and understands. */
export const META_FORMAT_VERSION = 1;
export const META_FILE = 'meta.json';
/** meta.json is a few hundred bytes; anything much larger is not ours. */
const META_BYTES_MAX = 64 * 1024;

export const REGION_SIZE_MIN = 4 * 1024;
export const REGION_SIZE_MAX = 16 * 1024 * 1024;

export type Role = 'primary' | 'secondary';

/** The volume's identity and geometry; scripts read these keys. */
export interface Meta {
  formatVersion: number;
  volumeId: string;
  size: number;
  regionSize: number;
  logSize: number;
  role: Role;
  createdAt: string;
}

export function newMeta(fields: {
  size: number;
  regionSize: number;
  logSize: number;
  role?: Role;
  volumeId?: string;
}): Meta {
  return {
    formatVersion: META_FORMAT_VERSION,
    volumeId: fields.volumeId ?? randomUUID(),
    size: fields.size,
    regionSize: fields.regionSize,
    logSize: fields.logSize,
    role: fields.role ?? 'primary',
    createdAt: new Date().toISOString(),
  };
}

const UUID_PATTERN = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

function isPositiveInt(v: unknown): v is number {
  return typeof v === 'number' && Number.isSafeInteger(v) && v > 0;
}

/** Checks parsed JSON against the Meta shape; every refusal says which field and why. */
export function validateMeta(value: unknown, where: string): Meta {
  const bad = (why: string) => new VolrepError('VOLREP_ERR_META', `${where}: ${why}`);
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw bad('not a JSON object');
  const m = value as Record<string, unknown>;
  if (typeof m.formatVersion !== 'number' || !Number.isInteger(m.formatVersion)) {
    throw bad('missing formatVersion');
  }
  if (m.formatVersion > META_FORMAT_VERSION) {
    throw new VolrepError(
      'VOLREP_ERR_META_VERSION',
      `${where}: formatVersion ${m.formatVersion} is newer than this volrep understands (${META_FORMAT_VERSION}); upgrade volrep`,
    );
  }
  if (m.formatVersion < 1) throw bad(`unknown formatVersion ${m.formatVersion}`);
  if (typeof m.volumeId !== 'string' || !UUID_PATTERN.test(m.volumeId)) throw bad('volumeId is not a UUID');
  if (!isPositiveInt(m.size)) throw bad('size is not a positive integer');
  if (!isPositiveInt(m.regionSize) || !isPowerOfTwo(m.regionSize))
    throw bad('regionSize is not a power of two');
  if (m.regionSize < REGION_SIZE_MIN || m.regionSize > REGION_SIZE_MAX) throw bad('regionSize out of range');
  if (!isPositiveInt(m.logSize)) throw bad('logSize is not a positive integer');
  if (m.role !== 'primary' && m.role !== 'secondary') throw bad("role is neither 'primary' nor 'secondary'");
  if (typeof m.createdAt !== 'string') throw bad('createdAt is not a string');
  return {
    formatVersion: m.formatVersion,
    volumeId: m.volumeId,
    size: m.size,
    regionSize: m.regionSize,
    logSize: m.logSize,
    role: m.role,
    createdAt: m.createdAt,
  };
}

export async function readMeta(metaDir: string): Promise<Meta> {
  const file = path.join(metaDir, META_FILE);
  let text: string;
  try {
    const handle = await fsp.open(file, 'r');
    try {
      const { size } = await handle.stat();
      if (size > META_BYTES_MAX)
        throw new VolrepError('VOLREP_ERR_META', `${file}: too large to be volrep metadata`);
      text = await handle.readFile('utf8');
    } finally {
      await handle.close();
    }
  } catch (err) {
    if (err instanceof VolrepError) throw err;
    if (errnoCode(err) === 'ENOENT') {
      throw new VolrepError('VOLREP_ERR_NOT_FOUND', `${file} not found: run 'volrep create' first`);
    }
    throw new VolrepError('VOLREP_ERR_META', `${file}: ${(err as Error).message}`);
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    throw new VolrepError('VOLREP_ERR_META', `${file}: corrupt (not valid JSON)`);
  }
  return validateMeta(parsed, file);
}

/** Writes a file so that a crash leaves either the old or the new content: temp file, fsync, rename, fsync dir. */
export async function writeFileAtomic(file: string, data: string | Uint8Array): Promise<void> {
  // A name of its own per call: two writers of the same file never share a temp file.
  const temp = `${file}.tmp-${process.pid}-${randomUUID().slice(0, 8)}`;
  try {
    const handle = await fsp.open(temp, 'wx', 0o644);
    try {
      await handle.writeFile(data);
      await handle.sync();
    } finally {
      await handle.close();
    }
    await fsp.rename(temp, file);
  } catch (err) {
    await fsp.rm(temp, { force: true });
    throw err;
  }
  await syncDirectory(path.dirname(file));
}

export async function syncDirectory(dir: string): Promise<void> {
  const handle = await fsp.open(dir, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

export async function writeMeta(metaDir: string, meta: Meta): Promise<void> {
  await writeFileAtomic(path.join(metaDir, META_FILE), `${JSON.stringify(meta, null, 2)}\n`);
}
