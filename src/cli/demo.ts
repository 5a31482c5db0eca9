/**
 * `volrep demo`: the main job on an embedded default, in a temporary directory. It creates a
 * primary and a secondary volume, starts both on 127.0.0.1 with the replication link running
 * through a switch the demo can open, writes a workload through NBD, cuts the link, writes more
 * (the dirty count grows), restores the link, shows the resync, and ends by comparing checksums.
 */
import { createHash, randomBytes } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';
import { type RunningPrimary, startPrimary } from '../daemon/primary.js';
import { startSecondary } from '../daemon/secondary.js';
import { VolrepError } from '../errors.js';
import { NbdClient } from '../nbd/client.js';
import { nodeIdentity } from '../security/identity.js';
import { formatSize, parseSize } from '../util/size.js';
import { createVolume, defaultMetaDir } from '../volume/volume.js';

export interface DemoFlags {
  size: string;
  keep: boolean;
}

const QUEUE_DEPTH = 16;
const DEADLINE_MS = 50_000;

export async function runDemo(flags: DemoFlags): Promise<void> {
  const size = parseSize(flags.size, '--size');
  if (size < 16 * 1024 * 1024)
    throw new VolrepError('VOLREP_ERR_SIZE', '--size must be at least 16M for the demo');
  const say = (line: string) => process.stdout.write(`${line}\n`);
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'volrep-demo-'));
  const logger = pino(
    // The demo's output is for a person: the daemons' JSON log shows only errors (or on request).
    { level: process.env.VOLREP_LOG_LEVEL ?? 'error' },
    pino.destination({ fd: 2, sync: true }),
  );
  const cleanup: (() => Promise<unknown>)[] = [];
  const started = Date.now();
  try {
    const primaryPath = path.join(dir, 'primary.img');
    const replicaPath = path.join(dir, 'replica.img');
    const meta = await createVolume({ volumePath: primaryPath, size });
    await createVolume({ volumePath: replicaPath, size, role: 'secondary', volumeId: meta.volumeId });
    say(
      `created ${primaryPath} and its replica ${replicaPath}: ${formatSize(size)}, regions of ${formatSize(meta.regionSize)}`,
    );
    // Each side pins the other's certificate, as two hosts would (volrep identity on each).
    const primaryId = await nodeIdentity(defaultMetaDir(primaryPath));
    const replicaId = await nodeIdentity(defaultMetaDir(replicaPath));
    say(
      `identities: primary ${primaryId.fingerprint.slice(0, 23)}…, replica ${replicaId.fingerprint.slice(0, 23)}… (mutual TLS 1.3)`,
    );

    const secondary = await startSecondary({
      volumePath: replicaPath,
      listen: { host: '127.0.0.1', port: 0 },
      link: { mode: 'tls', trust: { fingerprints: [primaryId.fingerprint] } },
      logger,
    });
    cleanup.push(() => secondary.close());
    const link = await LinkSwitch.start(Number(secondary.listenAddress.split(':').pop()));
    cleanup.push(() => link.close());
    // Both volumes were just created, all zero: they are identical, no initial full sync needed.
    const primary = await startPrimary({
      volumePath: primaryPath,
      nbd: { host: '127.0.0.1', port: 0 },
      exportName: 'volrep',
      peer: { host: '127.0.0.1', port: link.port },
      link: { mode: 'tls', trust: { fingerprints: [replicaId.fingerprint] } },
      assumeClean: true,
      logger,
    });
    cleanup.unshift(() => primary.close());
    say(`primary serves nbd://${primary.nbdAddress}/volrep and replicates to ${secondary.listenAddress}`);
    const [host, port] = splitAddress(primary.nbdAddress);
    const client = await NbdClient.connect(host, port, 'volrep');
    cleanup.unshift(() => client.close().catch(() => {}));

    await waitFor(() => primary.status().peer?.state === 'connected', 'the link to come up');
    const peer = primary.status().peer;
    say(
      `replication link: ${peer?.tls ? 'TLS 1.3, mutually authenticated' : 'plaintext'}, the primary verified ${peer?.fingerprint?.slice(0, 23)}…`,
    );
    let took = await writeWorkload(client, size, 2000);
    say(`wrote 2000 requests through NBD in ${took.toFixed(2)} s`);
    await waitInSync(primary);
    say(
      `in sync: dirty regions 0, replica consistent, acked through update ${primary.status().replica?.lastAckedUpdate}`,
    );

    link.cut();
    await waitFor(() => primary.status().peer?.state !== 'connected', 'the primary to notice the cut');
    say('link CUT');
    took = await writeWorkload(client, size, 300);
    const dirty = primary.status().dirtyRegions ?? 0;
    say(
      `wrote 300 more requests in ${took.toFixed(2)} s while cut: ${dirty} dirty regions (${mib(dirty * meta.regionSize)}) to resend`,
    );

    link.restore();
    say('link RESTORED: resyncing only the dirty regions');
    let last = '';
    await waitFor(() => {
      const s = primary.status();
      const line = `  ${s.peer?.state}: ${s.resync?.doneBytes ?? 0} of ${s.resync?.totalBytes ?? 0} bytes, ${s.dirtyRegions} dirty`;
      if (line !== last) say(line);
      last = line;
      return isInSync(s);
    }, 'the resync to finish');
    const sent = primary.status().resync?.doneBytes ?? 0;
    say(`resync done: ${mib(sent)} sent for ${dirty} dirty regions, of a ${mib(size)} volume`);
    await client.flush();
    await waitInSync(primary);

    const [p, r] = await Promise.all([sha256File(primaryPath), sha256File(replicaPath)]);
    say(`sha256 primary ${p}`);
    say(`sha256 replica ${r}`);
    if (p !== r) throw new Error('demo FAILED: the replica differs from the primary');
    say(
      `demo OK: the replica is byte-identical to the primary (${((Date.now() - started) / 1000).toFixed(1)} s)`,
    );
  } finally {
    for (const step of cleanup) await step().catch(() => {});
    if (flags.keep) say(`kept ${dir}`);
    else await fsp.rm(dir, { recursive: true, force: true });
  }
}

/** Random writes and some zeroes at queue depth 16, each worker in its own stripe. */
async function writeWorkload(client: NbdClient, size: number, count: number): Promise<number> {
  const started = performance.now();
  const stripe = Math.floor(size / QUEUE_DEPTH / 4096) * 4096;
  const worker = async (w: number) => {
    for (let i = w; i < count; i += QUEUE_DEPTH) {
      const length = 4096 * (1 + (i % 16));
      const offset = w * stripe + Math.floor(Math.random() * ((stripe - length) / 4096)) * 4096;
      if (i % 50 === 49) await client.writeZeroes(offset, length);
      else await client.write(offset, randomBytes(length));
    }
  };
  await Promise.all(Array.from({ length: QUEUE_DEPTH }, (_, w) => worker(w)));
  return (performance.now() - started) / 1000;
}

function isInSync(s: ReturnType<RunningPrimary['status']>): boolean {
  return (
    s.peer?.state === 'connected' &&
    s.dirtyRegions === 0 &&
    s.pendingUpdates === 0 &&
    s.replica?.consistent === true
  );
}

function waitInSync(primary: RunningPrimary): Promise<void> {
  return waitFor(() => isInSync(primary.status()), 'primary and replica to be in sync');
}

async function waitFor(check: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + DEADLINE_MS;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`demo FAILED: timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** A TCP relay on 127.0.0.1 standing in for the network between the two nodes. */
class LinkSwitch {
  private readonly sockets = new Set<net.Socket>();
  private open = true;

  private constructor(
    private readonly server: net.Server,
    readonly port: number,
  ) {}

  static async start(targetPort: number): Promise<LinkSwitch> {
    let self: LinkSwitch | undefined;
    const server = net.createServer((client) => {
      if (!self?.open) return client.destroy();
      const upstream = net.connect({ host: '127.0.0.1', port: targetPort });
      for (const [a, b] of [
        [client, upstream],
        [upstream, client],
      ]) {
        self.sockets.add(a);
        a.on('error', () => {});
        a.on('close', () => {
          b.destroy();
          self?.sockets.delete(a);
        });
        a.pipe(b);
      }
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
    self = new LinkSwitch(server, (server.address() as net.AddressInfo).port);
    return self;
  }

  cut(): void {
    this.open = false;
    for (const s of this.sockets) s.destroy();
  }

  restore(): void {
    this.open = true;
  }

  close(): Promise<void> {
    this.cut();
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}

async function sha256File(file: string): Promise<string> {
  const hash = createHash('sha256');
  const handle = await fsp.open(file, 'r');
  try {
    for await (const chunk of handle.createReadStream()) hash.update(chunk as Buffer);
  } finally {
    await handle.close().catch(() => {});
  }
  return hash.digest('hex');
}

function mib(bytes: number): string {
  return `${(bytes / 1024 ** 2).toFixed(1)} MiB`;
}

function splitAddress(address: string): [string, number] {
  const at = address.lastIndexOf(':');
  return [address.slice(0, at).replace(/^\[|\]$/g, ''), Number(address.slice(at + 1))];
}
