/**
 * The `volrep` command. Every user error is one line on stderr and exit code 2; a runtime failure
 * is one line and exit code 1; never a stack trace (set VOLREP_DEBUG=1 to see one).
 */
import { Command, CommanderError, Option } from 'commander';
import { EXIT_RUNTIME, EXIT_USAGE, VolrepError } from '../errors.js';
import { runCreate } from './create.js';
import { runDemo } from './demo.js';
import { runIdentity } from './identity.js';
import { collect } from './link-flags.js';
import { runPrimary } from './primary.js';
import { runDemote, runPromote } from './roles.js';
import { runSecondary } from './secondary.js';
import { runStatus } from './status.js';

function buildProgram(): Command {
  const program = new Command('volrep')
    .description('Asynchronous replication of block volumes, served over NBD')
    .version('0.1.0')
    .exitOverride()
    .configureOutput({ outputError: (text, write) => write(`${text.split('\n')[0]} (see volrep --help)\n`) });

  program
    .command('create')
    .description('create (or adopt) a volume and its metadata directory')
    .requiredOption('--volume <path>', 'volume file or block device')
    .requiredOption('--size <size>', 'volume size, e.g. 256M, 1G')
    .option('--region-size <size>', 'region size (power of two, 4K..16M)', '64K')
    .option('--log-size <size>', 'transaction log size', '64M')
    .option('--meta <dir>', 'metadata directory (default: <volume>.volrep)')
    .option('--force', 'replace existing metadata', false)
    .option(
      '--secondary-of <volume-id>',
      "create a replica for the primary volume with this id (see the primary's meta.json)",
    )
    .action(runCreate);

  program
    .command('primary')
    .description('serve the volume over NBD')
    .requiredOption('--volume <path>', 'volume file or block device')
    .option('--meta <dir>', 'metadata directory (default: <volume>.volrep)')
    .option('--nbd <host:port>', 'NBD listen address', '127.0.0.1:10809')
    .option('--export <name>', 'NBD export name', 'volrep')
    .addOption(
      new Option('--nbd-tls <mode>', 'NBD over TLS: off, on (the client chooses), require (TLS only)')
        .choices(['off', 'on', 'require'])
        .default('off'),
    )
    .option('--nbd-tls-cert <file>', "the NBD server's certificate (PEM)")
    .option('--nbd-tls-key <file>', 'its private key (mode 0600)')
    .option('--nbd-tls-ca <file>', 'require NBD client certificates signed by this CA (PEM)')
    .option('--nbd-insecure', 'serve NBD without required TLS on a non-loopback address', false)
    .option('--http <host:port>', 'serve /status and /metrics on this address')
    .option(
      '--peer <host:port>',
      'replicate to the secondary at this address (over TLS: see --peer-fingerprint)',
    )
    .option(
      '--peer-fingerprint <fingerprint>',
      "the secondary's certificate fingerprint, as 'volrep identity' prints it there (repeatable)",
      collect,
      [],
    )
    .option(
      '--listen <host:port>',
      'also answer on this replication address (a promoted replica: its old one), refusing any primary that dials it, so two primaries see a split brain',
    )
    .option('--tls-ca <file>', 'trust a secondary whose certificate this CA (PEM) signed')
    .option('--tls-cert <file>', "this node's certificate (PEM) instead of its generated identity")
    .option('--tls-key <file>', 'the private key of --tls-cert (mode 0600)')
    .option(
      '--insecure-plaintext',
      'no TLS on the replication link (loopback only; the secondary too)',
      false,
    )
    .addOption(
      new Option('--mode <mode>', 'async: complete writes locally; sync: after the secondary acks')
        .choices(['async', 'sync'])
        .default('async'),
    )
    .option('--ack-timeout <duration>', 'no ack for this long drops the link (regions stay dirty)', '5s')
    .option('--window <size>', 'bytes of updates in flight to the secondary before writes wait', '64M')
    .option(
      '--assume-clean',
      'both volumes are known identical (e.g. freshly created): no initial full sync',
      false,
    )
    .option('--activity-window <size>', 'recently written regions that need no new log record', '1G')
    .addOption(new Option('--read-only', 'refuse writes').default(false))
    .action(runPrimary);

  program
    .command('secondary')
    .description("receive a primary's replication stream and apply it to the replica")
    .requiredOption('--volume <path>', 'replica volume file or block device')
    .option('--meta <dir>', 'metadata directory (default: <volume>.volrep)')
    .option('--listen <host:port>', 'replication listen address', '127.0.0.1:10810')
    .option('--http <host:port>', 'serve /status and /metrics on this address')
    .option(
      '--allow-peer <fingerprint>',
      "accept the primary with this certificate fingerprint ('volrep identity' prints it there; repeatable)",
      collect,
      [],
    )
    .option('--tls-ca <file>', 'accept a primary whose certificate this CA (PEM) signed')
    .option('--tls-cert <file>', "this node's certificate (PEM) instead of its generated identity")
    .option('--tls-key <file>', 'the private key of --tls-cert (mode 0600)')
    .option('--insecure-plaintext', 'no TLS on the replication link (loopback only; the primary too)', false)
    .option(
      '--discard-local-changes',
      'give up the writes this side made while apart (resolves a split brain: the primary overwrites them)',
      false,
    )
    .action(runSecondary);

  program
    .command('promote')
    .description('make a stopped replica the primary (failover); it keeps its data and its dirty regions')
    .requiredOption('--volume <path>', 'replica volume file or block device')
    .option('--meta <dir>', 'metadata directory (default: <volume>.volrep)')
    .option(
      '--force',
      'promote a replica marked inconsistent (a resync into it was cut short): its data is no state the primary ever had',
      false,
    )
    .action(runPromote);

  program
    .command('demote')
    .description(
      'make a stopped primary a secondary; it gives up the writes it made while apart from its peer',
    )
    .requiredOption('--volume <path>', 'volume file or block device')
    .option('--meta <dir>', 'metadata directory (default: <volume>.volrep)')
    .action(runDemote);

  program
    .command('identity')
    .description("print this node's certificate fingerprint, to give to its peer")
    .option('--volume <path>', 'the volume whose metadata directory holds the identity')
    .option('--meta <dir>', 'the metadata directory')
    .action(runIdentity);

  program
    .command('status')
    .description("show a running daemon's state (from its --http address)")
    .requiredOption('--http <host:port>', "the daemon's --http address")
    .option('--json', 'print the raw JSON', false)
    .option('--watch', 'redraw every second (progress bar and ETA while resyncing)', false)
    .action(runStatus);

  program
    .command('demo')
    .description('create a volume in a temporary directory, serve it, write and verify a workload')
    .option('--size <size>', 'demo volume size', '256M')
    .option('--keep', 'keep the temporary directory', false)
    .action(runDemo);

  return program;
}

export async function main(argv: string[]): Promise<number> {
  const program = buildProgram();
  try {
    await program.parseAsync(argv);
    return 0;
  } catch (err) {
    if (err instanceof CommanderError) {
      if (
        err.code === 'commander.helpDisplayed' ||
        err.code === 'commander.version' ||
        err.code === 'commander.help'
      ) {
        return 0;
      }
      return EXIT_USAGE; // commander already printed the one-line reason
    }
    if (err instanceof VolrepError) {
      process.stderr.write(`volrep: ${err.message}\n`);
      if (process.env.VOLREP_DEBUG) process.stderr.write(`${err.stack}\n`);
      return err.exitCode;
    }
    process.stderr.write(`volrep: ${(err as Error).message ?? String(err)}\n`);
    if (process.env.VOLREP_DEBUG) process.stderr.write(`${(err as Error).stack}\n`);
    return EXIT_RUNTIME;
  }
}
