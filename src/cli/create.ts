import { VolrepError } from '../errors.js';
import { nodeIdentity } from '../security/identity.js';
import { parseSize } from '../util/size.js';
import { createVolume, defaultMetaDir } from '../volume/volume.js';

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

export interface CreateFlags {
  volume: string;
  size: string;
  regionSize: string;
  logSize: string;
  meta?: string;
  force: boolean;
  secondaryOf?: string;
}

export async function runCreate(flags: CreateFlags): Promise<void> {
  if (flags.secondaryOf !== undefined && !UUID.test(flags.secondaryOf)) {
    throw new VolrepError(
      'VOLREP_ERR_USAGE',
      `--secondary-of '${flags.secondaryOf}' is not a volume id (a UUID)`,
    );
  }
  const meta = await createVolume({
    volumePath: flags.volume,
    size: parseSize(flags.size, '--size'),
    regionSize: parseSize(flags.regionSize, '--region-size'),
    logSize: parseSize(flags.logSize, '--log-size'),
    metaDir: flags.meta,
    force: flags.force,
    role: flags.secondaryOf === undefined ? 'primary' : 'secondary',
    volumeId: flags.secondaryOf,
  });
  const metaDir = flags.meta ?? defaultMetaDir(flags.volume);
  const identity = await nodeIdentity(metaDir);
  const peerFlag = meta.role === 'primary' ? '--allow-peer' : '--peer-fingerprint';
  process.stdout.write(
    `created ${meta.role} volume ${flags.volume} (${meta.size} bytes, regions of ${meta.regionSize} bytes, id ${meta.volumeId})\n` +
      `metadata in ${metaDir}\n` +
      `identity ${identity.fingerprint} (for the ${meta.role === 'primary' ? 'secondary' : 'primary'}: ${peerFlag} ${identity.fingerprint})\n`,
  );
}
