import { promises as fsp, readFileSync } from 'node:fs';
import path from 'node:path';
import { errnoCode, VolrepError } from '../errors.js';

export const LOCK_FILE = 'lock';

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (err) {
    // EPERM: the process exists but belongs to someone else.
    return errnoCode(err) === 'EPERM';
  }
  // A killed process that is not yet reaped (a zombie) still answers signal 0 but holds nothing.
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return true;
  }
}

/**
 * An exclusive lock on a volume: a file in its metadata directory holding the owner's pid, created
 * with O_EXCL. A lock whose owner is gone (killed with SIGKILL) is stale and taken over.
 */
export class VolumeLock {
  /** Lock files this process holds: the pid in the file cannot tell two holders in one process apart. */
  private static readonly held = new Set<string>();

  private constructor(private readonly file: string) {}

  static async acquire(metaDir: string, volumePath: string): Promise<VolumeLock> {
    const file = path.resolve(metaDir, LOCK_FILE);
    if (VolumeLock.held.has(file)) {
      throw new VolrepError('VOLREP_ERR_LOCKED', `volume ${volumePath} is already open in this process`);
    }
    for (let attempt = 0; attempt < 3; attempt++) {
      try {
        await fsp.writeFile(file, `${process.pid}\n`, { flag: 'wx' });
        VolumeLock.held.add(file);
        return new VolumeLock(file);
      } catch (err) {
        if (errnoCode(err) !== 'EEXIST') throw err;
      }
      const owner = Number.parseInt(await fsp.readFile(file, 'utf8').catch(() => ''), 10);
      if (Number.isInteger(owner) && owner > 0 && owner !== process.pid && isAlive(owner)) {
        throw new VolrepError(
          'VOLREP_ERR_LOCKED',
          `volume ${volumePath} is in use by another volrep process (pid ${owner})`,
        );
      }
      await fsp.rm(file, { force: true });
    }
    throw new VolrepError(
      'VOLREP_ERR_LOCKED',
      `could not lock volume ${volumePath}: lock file keeps changing`,
    );
  }

  async release(): Promise<void> {
    VolumeLock.held.delete(this.file);
    await fsp.rm(this.file, { force: true });
  }
}
