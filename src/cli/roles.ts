import { shortGeneration } from '../replication/generations.js';
import { becomeSecondary, promote } from '../volume/roles.js';

export interface PromoteFlags {
  volume: string;
  meta?: string;
  force: boolean;
}

/** `volrep promote`: a stopped replica becomes the primary (failover). */
export async function runPromote(flags: PromoteFlags): Promise<void> {
  const change = await promote(flags.volume, { metaDir: flags.meta, force: flags.force });
  process.stdout.write(
    `${flags.volume} is a primary now (generation ${shortGeneration(change.after.current)}; a new one starts with its first write).\n` +
      `Serve it: volrep primary --volume ${flags.volume} [--peer <old primary's replication address> ...]\n` +
      `When the old primary returns: 'volrep demote' there, then start it as 'volrep secondary': only what differs is sent.\n`,
  );
}

export interface DemoteFlags {
  volume: string;
  meta?: string;
}

/** `volrep demote`: a stopped primary will follow; it gives up the history it began while apart. */
export async function runDemote(flags: DemoteFlags): Promise<void> {
  const change = await becomeSecondary(flags.volume, { metaDir: flags.meta, giveUp: true });
  const gaveUp = change.before.current !== change.after.current;
  process.stdout.write(
    `${flags.volume} is a secondary now (generation ${shortGeneration(change.after.current)}` +
      (gaveUp
        ? `; the writes it made apart, generation ${shortGeneration(change.before.current)}, are given up`
        : '') +
      ').\nStart it: volrep secondary --volume ' +
      `${flags.volume} --listen <address>; the new primary resyncs the regions written there since the failover and those this side never got acked.\n`,
  );
}
