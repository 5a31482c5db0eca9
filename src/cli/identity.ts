/** `volrep identity`: the node's certificate fingerprint, in the form the peer's flags take. */
import { VolrepError } from '../errors.js';
import { ensureIdentity, identityName } from '../security/identity.js';
import { readMeta } from '../volume/meta.js';
import { defaultMetaDir } from '../volume/volume.js';

export interface IdentityFlags {
  volume?: string;
  meta?: string;
}

export async function runIdentity(flags: IdentityFlags): Promise<void> {
  if (flags.volume === undefined && flags.meta === undefined) {
    throw new VolrepError('VOLREP_ERR_USAGE', 'give --volume PATH or --meta DIR');
  }
  const metaDir = flags.meta ?? defaultMetaDir(flags.volume!);
  const meta = await readMeta(metaDir);
  const identity = await ensureIdentity(metaDir, identityName(meta.role, meta.volumeId), (made) =>
    process.stderr.write(`volrep: ${metaDir} had no identity: made one (${made.certFile})\n`),
  );
  process.stdout.write(`${identity.fingerprint}\n`);
  if (process.stdout.isTTY) {
    const flag = meta.role === 'primary' ? '--allow-peer' : '--peer-fingerprint';
    process.stderr.write(
      `give it to the ${meta.role === 'primary' ? 'secondary' : 'primary'}: ${flag} ${identity.fingerprint}\n`,
    );
  }
}
