/**
 * A primary/secondary pair of real `volrep` processes on 127.0.0.1 for the pair tests: creation of
 * both volumes, start/kill/restart of either side (optionally with a FaultProxy on the link),
 * status and metrics, "in sync" waits and the byte-identical check, and a seeded NBD writer.
 */
import assert from 'node:assert/strict';
import { closeSync, openSync, readFileSync, readSync } from 'node:fs';
import path from 'node:path';
import { NbdClient } from '../../src/nbd/client.js';
import { createVolumeCli, httpRequest, metricValue, sha256File, waitFor } from '../helpers/clients.js';
import {
  type Daemon,
  identityOf,
  type SecondaryDaemon,
  startPrimary,
  startSecondary,
  tempDir,
} from '../helpers/daemon.js';
import { FaultProxy } from '../helpers/fault-proxy.js';
import type { Prng } from '../sim/prng.js';

export const REGION = 64 * 1024;

/** The seed for this file's randomized rounds: VOLREP_SEED if set, else random; always printed. */
export function testSeed(file: string): number {
  const seed = process.env.VOLREP_SEED ? Number(process.env.VOLREP_SEED) : (Math.random() * 2 ** 32) >>> 0;
  console.log(`${file}: seed ${seed} (replay with VOLREP_SEED=${seed})`);
  return seed;
}

/** Rounds per randomized kind: VOLREP_PAIR_ROUNDS or `dflt`. */
export function rounds(dflt: number): number {
  return process.env.VOLREP_PAIR_ROUNDS ? Number(process.env.VOLREP_PAIR_ROUNDS) : dflt;
}

/** Fills a buffer from the PRNG (fast: 32 bits at a time). */
export function prngBytes(prng: Prng, length: number): Buffer {
  const buf = Buffer.alloc(length);
  let i = 0;
  for (; i + 4 <= length; i += 4) buf.writeUInt32LE(prng.next(), i);
  for (; i < length; i++) buf[i] = prng.int(256);
  return buf;
}

// biome-ignore lint/suspicious/noExplicitAny: JSON status documents are checked field by field
export type Json = any;

export async function getJson(address: string, urlPath: string): Promise<Json> {
  const r = await httpRequest(address, urlPath);
  assert.equal(r.status, 200, `GET ${urlPath} on ${address}: ${r.status} ${r.body}`);
  return JSON.parse(r.body);
}

export interface PairOptions {
  size?: string;
  /** Extra flags for `volrep primary` (besides --volume, --nbd, --http, --peer). */
  primaryExtra?: string[];
  /** Put a FaultProxy between the primary and the secondary. */
  proxy?: boolean;
  /** Extra flags for `volrep secondary`. */
  secondaryExtra?: string[];
  /** Replicate in plaintext (--insecure-plaintext on both sides) instead of TLS, the default. */
  plaintext?: boolean;
}

export class Pair {
  readonly dir: string;
  readonly primaryVolume: string;
  readonly secondaryVolume: string;
  readonly volumeId: string;
  primary: Daemon | undefined;
  secondary: SecondaryDaemon | undefined;
  proxy: FaultProxy | undefined;
  /** Fixed after the first start so that restarts listen where the primary (or proxy) points. */
  private secondaryListen: string | undefined;
  private readonly cleanupDir: () => void;
  /** stderr of processes that were killed or stopped, for failure messages. */
  private readonly pastLogs: string[] = [];

  constructor(
    readonly opts: PairOptions = {},
    secondaryOf?: string,
  ) {
    const tmp = tempDir('volrep-pair-');
    this.dir = tmp.dir;
    this.cleanupDir = tmp.cleanup;
    const size = opts.size ?? '32M';
    this.primaryVolume = createVolumeCli(this.dir, 'p.img', size);
    const meta = JSON.parse(readFileSync(path.join(this.dir, 'p.img.volrep/meta.json'), 'utf8')) as {
      volumeId: string;
    };
    this.volumeId = meta.volumeId;
    this.secondaryVolume = createVolumeCli(this.dir, 's.img', size, [
      '--secondary-of',
      secondaryOf ?? this.volumeId,
    ]);
  }

  /** The flags each side needs to trust the other: the fingerprints, pinned (or plaintext). */
  private linkFlags(role: 'primary' | 'secondary'): string[] {
    if (this.opts.plaintext) return ['--insecure-plaintext'];
    return role === 'primary'
      ? ['--peer-fingerprint', identityOf(this.secondaryVolume)]
      : ['--allow-peer', identityOf(this.primaryVolume)];
  }

  async startSecondary(): Promise<SecondaryDaemon> {
    this.secondary = await startSecondary(this.secondaryVolume, {
      listen: this.secondaryListen,
      http: true,
      extra: [...this.linkFlags('secondary'), ...(this.opts.secondaryExtra ?? [])],
    });
    this.secondaryListen = this.secondary.listen;
    return this.secondary;
  }

  /** The --peer address the primary uses (the proxy's when there is one). */
  async peerAddress(): Promise<string> {
    assert.ok(this.secondaryListen, 'start the secondary first');
    if (!this.opts.proxy) return this.secondaryListen;
    if (!this.proxy) {
      const at = this.secondaryListen.lastIndexOf(':');
      this.proxy = new FaultProxy({
        host: this.secondaryListen.slice(0, at),
        port: Number(this.secondaryListen.slice(at + 1)),
      });
      await this.proxy.start();
    }
    return `127.0.0.1:${this.proxy.port}`;
  }

  async startPrimary(): Promise<Daemon> {
    const peer = await this.peerAddress();
    this.primary = await startPrimary(this.primaryVolume, {
      http: true,
      extra: ['--peer', peer, ...this.linkFlags('primary'), ...(this.opts.primaryExtra ?? [])],
    });
    return this.primary;
  }

  async start(): Promise<void> {
    await this.startSecondary();
    await this.startPrimary();
  }

  async killPrimary(): Promise<void> {
    if (!this.primary) return;
    await this.primary.kill();
    this.pastLogs.push(`--- killed primary ---\n${this.primary.stderr()}`);
    this.primary = undefined;
  }

  async killSecondary(): Promise<void> {
    if (!this.secondary) return;
    await this.secondary.kill();
    this.pastLogs.push(`--- killed secondary ---\n${this.secondary.stderr()}`);
    this.secondary = undefined;
  }

  primaryStatus(): Promise<Json> {
    return getJson(this.primary!.http!, '/status');
  }

  secondaryStatus(): Promise<Json> {
    return getJson(this.secondary!.http!, '/status');
  }

  async primaryMetric(name: string): Promise<number> {
    const r = await httpRequest(this.primary!.http!, '/metrics');
    const v = metricValue(r.body, name);
    assert.ok(v !== undefined, `no ${name} in /metrics`);
    return v;
  }

  /** Both statuses and the tails of both logs, for failure messages. */
  async describe(): Promise<string> {
    const safe = async (f: () => Promise<Json>) => {
      try {
        return JSON.stringify(await f());
      } catch (err) {
        return `(unavailable: ${(err as Error).message})`;
      }
    };
    const tail = (s: string | undefined) => (s ?? '').split('\n').slice(-25).join('\n');
    return [
      `primary /status: ${this.primary ? await safe(() => this.primaryStatus()) : '(not running)'}`,
      `secondary /status: ${this.secondary ? await safe(() => this.secondaryStatus()) : '(not running)'}`,
      `primary log tail:\n${tail(this.primary?.stderr())}`,
      `secondary log tail:\n${tail(this.secondary?.stderr())}`,
      `earlier processes' log tails:\n${this.pastLogs.map(tail).join('\n')}`,
    ].join('\n');
  }

  /** In sync: peer connected, no dirty region, no pending update, replica consistent. */
  async inSync(): Promise<boolean> {
    const s = await this.primaryStatus();
    return (
      s.peer?.state === 'connected' &&
      s.dirtyRegions === 0 &&
      s.pendingUpdates === 0 &&
      s.replica?.consistent === true
    );
  }

  async waitInSync(what: string, timeoutMs = 20_000): Promise<void> {
    try {
      await waitFor(() => this.inSync(), `${what}: pair in sync`, timeoutMs, 50);
    } catch (err) {
      throw new Error(`${(err as Error).message}\n${await this.describe()}`);
    }
  }

  async waitPeerState(states: string[], what: string, timeoutMs = 10_000): Promise<void> {
    try {
      await waitFor(
        async () => states.includes((await this.primaryStatus()).peer?.state),
        `${what}: primary peer state in ${states.join('|')}`,
        timeoutMs,
        20,
      );
    } catch (err) {
      throw new Error(`${(err as Error).message}\n${await this.describe()}`);
    }
  }

  /** SHA-256 of both volume files must be equal; on a difference, says which regions differ. */
  async assertIdentical(what: string): Promise<void> {
    const [a, b] = await Promise.all([sha256File(this.primaryVolume), sha256File(this.secondaryVolume)]);
    if (a === b) return;
    const regions = differingRegions(this.primaryVolume, this.secondaryVolume);
    assert.fail(
      `${what}: volume and replica differ (sha256 ${a} vs ${b}); ${regions.length} differing regions ` +
        `of ${REGION} bytes, first: ${regions.slice(0, 10).join(', ')}\n${await this.describe()}`,
    );
  }

  async cleanup(): Promise<void> {
    await this.primary?.kill();
    await this.secondary?.kill();
    await this.proxy?.stop();
    this.cleanupDir();
  }
}

/** Indexes of the regions whose bytes differ between two equally sized files. */
export function differingRegions(fileA: string, fileB: string): number[] {
  const fa = openSync(fileA, 'r');
  const fb = openSync(fileB, 'r');
  const out: number[] = [];
  try {
    const ba = Buffer.alloc(REGION);
    const bb = Buffer.alloc(REGION);
    for (let i = 0; ; i++) {
      const na = readSync(fa, ba, 0, REGION, i * REGION);
      const nb = readSync(fb, bb, 0, REGION, i * REGION);
      if (na === 0 && nb === 0) break;
      if (na !== nb || !ba.subarray(0, na).equals(bb.subarray(0, nb))) out.push(i);
      if (na < REGION) break;
    }
  } finally {
    closeSync(fa);
    closeSync(fb);
  }
  return out;
}

/**
 * A seeded write workload through volrep's NBD client: data writes of 1 byte to 128 KiB at random
 * offsets, some write-zeroes, trims and flushes, `depth` requests in flight. Errors (the primary
 * was killed) end the loop; they are counted, not thrown.
 */
export class Writer {
  acknowledged = 0;
  failed = 0;
  /** The first error a request got (connection lost when the primary was killed, or an NBD error). */
  firstError: Error | undefined;
  private stopping = false;
  private client: NbdClient | undefined;
  private loops: Promise<void>[] = [];

  constructor(
    private readonly prng: Prng,
    private readonly size: number,
    private readonly depth = 4,
  ) {}

  async start(nbd: { host: string; port: number }): Promise<void> {
    this.client = await NbdClient.connect(nbd.host, nbd.port, 'volrep');
    for (let i = 0; i < this.depth; i++) this.loops.push(this.loop(this.client));
  }

  /** Resolves once `n` more requests have been acknowledged (or the loop ended). */
  async waitAcknowledged(n: number, timeoutMs = 10_000): Promise<void> {
    const target = this.acknowledged + n;
    await waitFor(() => this.acknowledged >= target || this.failed > 0, `${n} NBD writes`, timeoutMs, 5);
  }

  private async loop(client: NbdClient): Promise<void> {
    while (!this.stopping && this.failed === 0) {
      const p = this.prng;
      const roll = p.int(100);
      try {
        if (roll < 80) {
          const length = p.chance(0.5) ? 4096 * (1 + p.int(32)) : 1 + p.int(128 * 1024);
          const offset = p.chance(0.5)
            ? 4096 * p.int((this.size - length) / 4096)
            : p.int(this.size - length);
          await client.write(offset, prngBytes(p, length), p.chance(0.05));
        } else if (roll < 88) {
          const length = 1 + p.int(256 * 1024);
          await client.writeZeroes(p.int(this.size - length), length);
        } else if (roll < 94) {
          const length = 4096 * (1 + p.int(64));
          await client.trim(4096 * p.int((this.size - length) / 4096), length);
        } else {
          await client.flush();
        }
        this.acknowledged++;
      } catch (err) {
        this.failed++;
        this.firstError ??= err as Error;
      }
    }
  }

  /** Stops issuing, waits for what is in flight, disconnects (quietly if the server is gone). */
  async stop(): Promise<void> {
    this.stopping = true;
    await Promise.all(this.loops);
    const connectionAlive =
      this.failed === 0 || (this.firstError as { nbdError?: number }).nbdError !== undefined;
    if (connectionAlive && this.client) {
      await Promise.race([this.client.close(), new Promise((resolve) => setTimeout(resolve, 2000))]);
    }
  }
}
