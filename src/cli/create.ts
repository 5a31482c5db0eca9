import { parseSize } from '../util/size.js';
import { createVolume, defaultMetaDir } from '../volume/volume.js';

export interface CreateFlags {
  volume: string;
  size: string;
  regionSize: string;
  logSize: string;
  meta?: string;
  force: boolean;
}

export async function runCreate(flags: CreateFlags): Promise<void> {
  const meta = await createVolume({
    volumePath: flags.volume,
    size: parseSize(flags.size, '--size'),
    regionSize: parseSize(flags.regionSize, '--region-size'),
    logSize: parseSize(flags.logSize, '--log-size'),
    metaDir: flags.meta,
    force: flags.force,
  });
  process.stdout.write(
    `created volume ${flags.volume} (${meta.size} bytes, regions of ${meta.regionSize} bytes, id ${meta.volumeId})\n` +
      `metadata in ${flags.meta ?? defaultMetaDir(flags.volume)}\n`,
  );
}
