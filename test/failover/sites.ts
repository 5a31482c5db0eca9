/**
 * Two sites, A and B, each a volume with its metadata and identity, for the failover tests: either
 * runs as `volrep primary` (replicating to the other) or `volrep secondary`, as real processes, and
 * roles change with the real `volrep promote` / `volrep demote`. Each site keeps one replication
 * port for its whole life, so a primary can be pointed at a secondary that is not started yet.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { NbdClient } from '../../src/nbd/client.js';
import { createVolumeCli, httpRequest, metricValue, sha256File, waitFor } from '../helpers/clients.js';
import {
  type CliResult,
  type Daemon,
  identityOf,
  type SecondaryDaemon,
  startPrimary,
  startSecondary,
  tempDir,
  volrep,
} from '../helpers/daemon.js';
import { differingRegions, getJson, type Json, REGION } from '../pair/pair.js';

export { REGION };

export type SiteName = 'A' | 'B';

export interface Site {
  name: SiteName;
  volume: string;
  /** This site's replication listen address (fixed). */
  listen: string;
  primary?: Daemon;
  secondary?: SecondaryDaemon;
}

/** Writes one region-sized block of `fill` at the start of each region, then flushes. */
export async function writeRegions(primary: Daemon, regions: Iterable<number>, fill: number): Promise<void> {
  const client = await NbdClient.connect(primary.nbd.host, primary.nbd.port, 'volrep');
  try {
    for (const r of regions) await client.write(r * REGION, Buffer.alloc(REGION, fill));
    await client.flush();
  } finally {
    await client.close();
  }
}

/** A port the OS had free a moment ago (loopback only). */
async function freePort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as net.AddressInfo;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

export class Sites {
  readonly dir: string;
  readonly volumeId: string;
  readonly size: number;
  a!: Site;
  b!: Site;
  private readonly cleanupDir: () => void;
  private readonly pastLogs: string[] = [];

  private constructor(size: string) {
    const tmp = tempDir('volrep-failover-');
    this.dir = tmp.dir;
    this.cleanupDir = tmp.cleanup;
    const a = createVolumeCli(this.dir, 'a.img', size);
    this.volumeId = JSON.parse(readFileSync(path.join(this.dir, 'a.img.volrep/meta.json'), 'utf8')).volumeId;
    const b = createVolumeCli(this.dir, 'b.img', size, ['--secondary-of', this.volumeId]);
    this.size = JSON.parse(readFileSync(path.join(this.dir, 'a.img.volrep/meta.json'), 'utf8')).size;
    this.a = { name: 'A', volume: a, listen: '' };
    this.b = { name: 'B', volume: b, listen: '' };
  }

  /** A is created as the primary, B as its replica. */
  static async create(size = '16M'): Promise<Sites> {
    const sites = new Sites(size);
    sites.a.listen = `127.0.0.1:${await freePort()}`;
    sites.b.listen = `127.0.0.1:${await freePort()}`;
    return sites;
  }

  other(site: Site): Site {
    return site === this.a ? this.b : this.a;
  }

  async startSecondary(site: Site, extra: string[] = []): Promise<SecondaryDaemon> {
    assert.equal(site.primary, undefined, `${site.name} runs as a primary`);
    site.secondary = await startSecondary(site.volume, {
      listen: site.listen,
      http: true,
      extra: ['--allow-peer', identityOf(this.other(site).volume), ...extra],
    });
    return site.secondary;
  }

  /** `volrep primary` on `site`, replicating to the other site's address (up or not). */
  async startPrimary(site: Site, extra: string[] = []): Promise<Daemon> {
    assert.equal(site.secondary, undefined, `${site.name} runs as a secondary`);
    const peer = this.other(site);
    site.primary = await startPrimary(site.volume, {
      http: true,
      extra: ['--peer', peer.listen, '--peer-fingerprint', identityOf(peer.volume), ...extra],
    });
    return site.primary;
  }

  /** SIGKILL whatever runs on `site`. */
  async kill(site: Site): Promise<void> {
    for (const d of [site.primary, site.secondary]) {
      if (!d) continue;
      await d.kill();
      this.pastLogs.push(`--- ${site.name} killed ---\n${d.stderr()}`);
    }
    site.primary = undefined;
    site.secondary = undefined;
  }

  /** SIGTERM (graceful: flush, persist) whatever runs on `site`. */
  async stop(site: Site): Promise<void> {
    for (const d of [site.primary, site.secondary]) {
      if (!d) continue;
      const code = await d.stop();
      this.pastLogs.push(`--- ${site.name} stopped (${code}) ---\n${d.stderr()}`);
      assert.equal(code, 0, `${site.name} stopped with ${code}:\n${d.stderr()}`);
    }
    site.primary = undefined;
    site.secondary = undefined;
  }

  /** The role in the site's meta.json. */
  role(site: Site): 'primary' | 'secondary' {
    return JSON.parse(readFileSync(`${site.volume}.volrep/meta.json`, 'utf8')).role;
  }

  promote(site: Site, force = false): CliResult {
    return volrep(['promote', '--volume', site.volume, ...(force ? ['--force'] : [])]);
  }

  demote(site: Site): CliResult {
    return volrep(['demote', '--volume', site.volume]);
  }

  private http(site: Site): string {
    const address = site.primary?.http ?? site.secondary?.http;
    assert.ok(address, `${site.name} is not running`);
    return address;
  }

  status(site: Site): Promise<Json> {
    return getJson(this.http(site), '/status');
  }

  async metric(site: Site, name: string, labels: Record<string, string> = {}): Promise<number> {
    const r = await httpRequest(this.http(site), '/metrics');
    const v = metricValue(r.body, name, labels);
    assert.ok(v !== undefined, `no ${name} in /metrics of ${site.name}`);
    return v;
  }

  /** The regions `site` has dirty (primary: may differ from its replica; secondary: its own). */
  async dirtyRegions(site: Site): Promise<Set<number>> {
    const { ranges } = (await getJson(this.http(site), '/dirty')) as { ranges: [number, number][] };
    const out = new Set<number>();
    for (const [first, last] of ranges) for (let r = first; r <= last; r++) out.add(r);
    return out;
  }

  /** The primary on `site` reports its replica in sync: connected, nothing dirty or pending. */
  async waitInSync(site: Site, what: string, timeoutMs = 20_000): Promise<void> {
    try {
      await waitFor(
        async () => {
          const s = await this.status(site);
          return (
            s.peer?.state === 'connected' &&
            s.dirtyRegions === 0 &&
            s.pendingUpdates === 0 &&
            s.replica?.consistent === true
          );
        },
        `${what}: ${site.name} in sync`,
        timeoutMs,
        50,
      );
    } catch (err) {
      throw new Error(`${(err as Error).message}\n${await this.describe()}`);
    }
  }

  /** Waits until `site`'s last handshake decided `decision`. */
  async waitDecision(site: Site, decision: string, what: string, timeoutMs = 15_000): Promise<Json> {
    let last: Json;
    try {
      await waitFor(
        async () => {
          last = await this.status(site);
          return last.handshake?.decision === decision;
        },
        `${what}: ${site.name} decides ${decision}`,
        timeoutMs,
        50,
      );
    } catch (err) {
      throw new Error(
        `${(err as Error).message}\nlast status: ${JSON.stringify(last)}\n${await this.describe()}`,
      );
    }
    return last;
  }

  differing(): number[] {
    return differingRegions(this.a.volume, this.b.volume);
  }

  async assertIdentical(what: string): Promise<void> {
    const [x, y] = await Promise.all([sha256File(this.a.volume), sha256File(this.b.volume)]);
    if (x === y) return;
    const regions = this.differing();
    assert.fail(
      `${what}: A and B differ in ${regions.length} regions (first ${regions.slice(0, 10)})\n${await this.describe()}`,
    );
  }

  async describe(): Promise<string> {
    const lines: string[] = [];
    for (const site of [this.a, this.b]) {
      const d = site.primary ?? site.secondary;
      if (!d) {
        lines.push(`${site.name}: not running`);
        continue;
      }
      let status = '(unavailable)';
      try {
        status = JSON.stringify(await this.status(site));
      } catch {}
      lines.push(`${site.name} (${site.primary ? 'primary' : 'secondary'}) /status: ${status}`);
      lines.push(`${site.name} log tail:\n${d.stderr().split('\n').slice(-20).join('\n')}`);
    }
    lines.push(
      `earlier processes:\n${this.pastLogs.map((l) => l.split('\n').slice(-12).join('\n')).join('\n')}`,
    );
    return lines.join('\n');
  }

  async cleanup(): Promise<void> {
    for (const site of [this.a, this.b]) {
      await site.primary?.kill();
      await site.secondary?.kill();
    }
    this.cleanupDir();
  }
}
