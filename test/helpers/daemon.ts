/**
 * Starts volrep daemons as real processes for tests, on 127.0.0.1 with ports the OS picks, and
 * learns their addresses from the JSON log line they print when ready.
 */
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { fingerprintOf } from '../../src/security/fingerprint.js';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const VOLREP_BIN = path.join(ROOT, 'bin/volrep.js');

export interface CliResult {
  status: number | null;
  stdout: string;
  stderr: string;
}

/** Runs `volrep ARGS` to completion. */
export function volrep(args: string[], opts: { cwd?: string } = {}): CliResult {
  const r = spawnSync(process.execPath, [VOLREP_BIN, ...args], {
    cwd: opts.cwd,
    encoding: 'utf8',
    timeout: 60_000,
  });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

export interface Daemon {
  child: ChildProcess;
  nbd: { host: string; port: number; uri: string };
  http?: string;
  /** Everything the daemon has written to stderr so far. */
  stderr(): string;
  /** SIGTERM and wait for exit; returns the exit code. */
  stop(): Promise<number | null>;
  /** SIGKILL and wait for exit. */
  kill(): Promise<void>;
}

/**
 * Spawns `volrep ROLE ARGS`, waits for its JSON ready line (`"<role> serving"`) and returns it
 * parsed, with stop (SIGTERM) and kill (SIGKILL) that wait for the exit. A daemon that does not
 * get ready within 15 s is killed.
 */
async function spawnDaemon<T>(role: 'primary' | 'secondary', args: string[]) {
  const child = spawn(process.execPath, [VOLREP_BIN, role, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let err = '';
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const ready = await new Promise<T>((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`${role} did not start in time:\n${err}`));
    }, 15_000);
    child.stderr!.setEncoding('utf8');
    child.stderr!.on('data', (chunk: string) => {
      err += chunk;
      const line = err.split('\n').find((l) => l.includes(`"${role} serving"`));
      if (line === undefined) return;
      clearTimeout(timer);
      resolve(JSON.parse(line) as T);
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`${role} exited with ${code} before it was ready:\n${err}`));
    });
  });
  child.stdout!.resume();
  const running = () => child.exitCode === null && child.signalCode === null;
  return {
    ready,
    child,
    stderr: () => err,
    async stop() {
      if (running()) child.kill('SIGTERM');
      return exited;
    },
    async kill() {
      if (running()) child.kill('SIGKILL');
      await exited;
    },
  };
}

/** Starts `volrep primary --volume VOLUME` with NBD (and HTTP if asked) on OS-chosen ports. */
export async function startPrimary(
  volume: string,
  opts: { http?: boolean; extra?: string[] } = {},
): Promise<Daemon> {
  const args = ['--volume', volume, '--nbd', '127.0.0.1:0', ...(opts.extra ?? [])];
  if (opts.http) args.push('--http', '127.0.0.1:0');
  const { ready, ...daemon } = await spawnDaemon<{ nbd: string; http?: string }>('primary', args);
  const at = ready.nbd.lastIndexOf(':');
  return {
    ...daemon,
    nbd: {
      host: ready.nbd.slice(0, at),
      port: Number(ready.nbd.slice(at + 1)),
      uri: `nbd://${ready.nbd}/volrep`,
    },
    http: ready.http,
  };
}

/** The certificate fingerprint of a volume's node identity (what `volrep identity` prints). */
export function identityOf(volume: string, metaDir = `${volume}.volrep`): string {
  return fingerprintOf(readFileSync(path.join(metaDir, 'identity.crt'), 'utf8'));
}

/** A fresh temporary directory, removed by the returned cleanup. */
export function tempDir(prefix = 'volrep-test-'): { dir: string; cleanup: () => void } {
  const dir = mkdtempSync(path.join(os.tmpdir(), prefix));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

/** Whether an external tool is on PATH; tests that need it skip locally (never in CI) when it is not. */
export function hasTool(name: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${name}`]).status === 0;
}

/**
 * Skip reason for a test needing `tool`: undefined when present. In CI (CI=true) a missing tool
 * is a failure, not a skip, so a test can never silently stop running there.
 */
export function needTool(tool: string, debianPackage: string): string | undefined {
  if (hasTool(tool)) return undefined;
  if (process.env.CI) throw new Error(`${tool} is missing in CI: .ci/run must install ${debianPackage}`);
  return `${tool} not installed (apt-get install ${debianPackage})`;
}

export interface SecondaryDaemon {
  child: ChildProcess;
  /** The replication listen address (host:port). */
  listen: string;
  http?: string;
  stderr(): string;
  /** SIGTERM and wait for exit; returns the exit code. */
  stop(): Promise<number | null>;
  /** SIGKILL and wait for exit. */
  kill(): Promise<void>;
}

/**
 * Starts `volrep secondary --volume VOLUME` listening on `opts.listen` (default an OS-chosen port on
 * 127.0.0.1), with HTTP on an OS-chosen port if asked; resolves on its "secondary serving" line.
 */
export async function startSecondary(
  volume: string,
  opts: { listen?: string; http?: boolean; extra?: string[] } = {},
): Promise<SecondaryDaemon> {
  const args = ['--volume', volume, '--listen', opts.listen ?? '127.0.0.1:0', ...(opts.extra ?? [])];
  if (opts.http) args.push('--http', '127.0.0.1:0');
  const { ready, ...daemon } = await spawnDaemon<{ listen: string; http?: string }>('secondary', args);
  return { ...daemon, listen: ready.listen, http: ready.http };
}
