/**
 * Helpers for driving a running volrep daemon with external NBD clients (qemu-io, nbdinfo,
 * nbdcopy, qemu-img, fio) and for checking what ends up in the volume file.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { closeSync, createReadStream, openSync, readSync } from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { NbdClient } from '../../src/nbd/client.js';
import { type CliResult, type Daemon, VOLREP_BIN, volrep } from './daemon.js';

export interface RunResult {
  /** Exit code, or null when the process was killed by a signal. */
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Runs a command to completion without throwing on a non-zero exit; `timeout` kills it (SIGKILL). */
export function run(
  cmd: string,
  args: string[],
  opts: { cwd?: string; timeout?: number; env?: NodeJS.ProcessEnv } = {},
): Promise<RunResult> {
  return new Promise((resolve) => {
    execFile(
      cmd,
      args,
      {
        cwd: opts.cwd,
        env: opts.env,
        timeout: opts.timeout ?? 120_000,
        killSignal: 'SIGKILL',
        maxBuffer: 64 * 1024 * 1024,
        encoding: 'utf8',
      },
      (err, stdout, stderr) => {
        const e = err as (Error & { code?: number | string; signal?: NodeJS.Signals }) | null;
        resolve({
          code: e ? (typeof e.code === 'number' ? e.code : null) : 0,
          signal: e?.signal ?? null,
          stdout,
          stderr,
        });
      },
    );
  });
}

/** A readable description of a finished command for assertion messages. */
export function describeRun(what: string, r: RunResult): string {
  return `${what}: exit ${r.code} signal ${r.signal}\nstdout:\n${r.stdout}\nstderr:\n${r.stderr}`;
}

/** `qemu-io -f raw [extra] -c CMD ... URI`. */
export function qemuIo(uri: string, commands: string[], extra: string[] = []): Promise<RunResult> {
  const args = ['-f', 'raw', ...extra];
  for (const c of commands) args.push('-c', c);
  args.push(uri);
  return run('qemu-io', args);
}

/** SHA-256 (hex) of a whole file, streamed. */
export function sha256File(file: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const hash = createHash('sha256');
    createReadStream(file, { highWaterMark: 4 * 1024 * 1024 })
      .on('data', (chunk) => hash.update(chunk))
      .on('error', reject)
      .on('end', () => resolve(hash.digest('hex')));
  });
}

/** SHA-256 (hex) of the bytes [start, end) of a file. */
export function sha256Range(file: string, start: number, end: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const hash = createHash('sha256');
    if (end <= start) {
      resolve(hash.digest('hex'));
      return;
    }
    createReadStream(file, { start, end: end - 1, highWaterMark: 4 * 1024 * 1024 })
      .on('data', (chunk) => hash.update(chunk))
      .on('error', reject)
      .on('end', () => resolve(hash.digest('hex')));
  });
}

/** Reads `length` bytes at `offset` of a file (the volume file, to check what was stored). */
export function readRange(file: string, offset: number, length: number): Buffer {
  const buf = Buffer.alloc(length);
  const fd = openSync(file, 'r');
  try {
    let got = 0;
    while (got < length) {
      const n = readSync(fd, buf, got, length - got, offset + got);
      if (n === 0) throw new Error(`${file}: short read at ${offset + got}`);
      got += n;
    }
  } finally {
    closeSync(fd);
  }
  return buf;
}

/** The first offset in `buf` whose byte is not `value`, or -1 when every byte is `value`. */
export function firstByteNot(buf: Buffer, value: number): number {
  for (let i = 0; i < buf.length; i++) if (buf[i] !== value) return i;
  return -1;
}

/** Asserts that every byte of `file` in [offset, offset+length) is `value`. */
export function expectFile(file: string, offset: number, length: number, value: number): void {
  const at = firstByteNot(readRange(file, offset, length), value);
  assert.equal(
    at,
    -1,
    `${file}: byte at ${offset + at} should be 0x${value.toString(16)} (range ${offset}+${length})`,
  );
}

/** Polls `cond` until it is true; fails with `what` after `timeoutMs`. */
export async function waitFor(
  cond: () => boolean | Promise<boolean>,
  what: string,
  timeoutMs = 10_000,
  intervalMs = 20,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await cond()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, intervalMs));
  }
}

/** Waits for a child process to exit; rejects after `timeoutMs` (the caller kills it in cleanup). */
export function waitExit(
  child: ChildProcess,
  timeoutMs: number,
): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  if (child.exitCode !== null || child.signalCode !== null) {
    return Promise.resolve({ code: child.exitCode, signal: child.signalCode });
  }
  return new Promise((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`process ${child.pid} did not exit within ${timeoutMs} ms`)),
      timeoutMs,
    );
    child.once('exit', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal });
    });
  });
}

/** A plain HTTP request to `host:port`. */
export function httpRequest(
  address: string,
  urlPath: string,
  method = 'GET',
): Promise<{ status: number; contentType: string; body: string }> {
  const at = address.lastIndexOf(':');
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        host: address.slice(0, at),
        port: Number(address.slice(at + 1)),
        path: urlPath,
        method,
        timeout: 5000,
      },
      (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (chunk: string) => {
          body += chunk;
        });
        res.on('end', () =>
          resolve({ status: res.statusCode ?? 0, contentType: res.headers['content-type'] ?? '', body }),
        );
        res.on('error', reject);
      },
    );
    req.on('timeout', () => req.destroy(new Error(`HTTP ${method} ${urlPath} timed out`)));
    req.on('error', reject);
    req.end();
  });
}

/**
 * The value of one sample in Prometheus text, e.g. metricValue(text, 'volrep_nbd_requests_total',
 * {command: 'write', result: 'ok'}); undefined when there is no such sample.
 */
export function metricValue(
  text: string,
  name: string,
  labels: Record<string, string> = {},
): number | undefined {
  for (const line of text.split('\n')) {
    if (line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s+(\S+)/.exec(line);
    if (!m || m[1] !== name) continue;
    const have: Record<string, string> = {};
    for (const pair of (m[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
      have[pair[1]] = pair[2];
    }
    const keys = Object.keys(labels);
    if (keys.length !== Object.keys(have).length) continue;
    if (keys.every((k) => have[k] === labels[k])) return Number(m[3]);
  }
  return undefined;
}

/** Creates a volume with `volrep create` in `dir`; throws with the CLI's output if it fails. */
export function createVolumeCli(dir: string, name: string, size: string, extra: string[] = []): string {
  const volume = path.join(dir, name);
  const r = volrep(['create', '--volume', volume, '--size', size, ...extra]);
  if (r.status !== 0) {
    throw new Error(`volrep create failed (${r.status}):\n${r.stdout}\n${r.stderr}`);
  }
  return volume;
}

/**
 * Runs `volrep ARGS` asynchronously, killed (SIGKILL) after `timeoutMs`: for commands that are
 * expected to fail fast but would otherwise serve forever if they did not.
 */
export function volrepAsync(args: string[], timeoutMs = 15_000, cwd?: string): Promise<RunResult> {
  return run(process.execPath, [VOLREP_BIN, ...args], { timeout: timeoutMs, cwd });
}

/** The non-empty lines of a stream's output. */
export function nonEmptyLines(text: string): string[] {
  return text.split('\n').filter((l) => l.trim() !== '');
}

/**
 * A user error as the README promises it: exit code 2, exactly one line on stderr, no stack trace,
 * nothing on stdout; optionally matching `pattern`.
 */
export function assertUsageError(r: CliResult | RunResult, pattern?: RegExp): void {
  const exit = 'status' in r ? r.status : r.code;
  const detail = `exit ${exit}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`;
  assert.equal(exit, 2, detail);
  assert.equal(nonEmptyLines(r.stderr).length, 1, `exactly one line on stderr expected\n${detail}`);
  assert.ok(r.stderr.endsWith('\n'), `stderr must end with a newline\n${detail}`);
  assert.doesNotMatch(r.stderr, /^\s+at /m, `no stack trace\n${detail}`);
  assert.equal(r.stdout, '', `nothing on stdout\n${detail}`);
  if (pattern) assert.match(r.stderr, pattern);
}

/**
 * One NBD handshake with the daemon, then a clean disconnect. The daemon prints its ready line
 * before it installs its SIGTERM/SIGINT handlers (in the same event-loop turn); once it has served
 * a connection, that turn is over, so a signal sent afterwards meets the handlers.
 */
export async function nbdRoundTrip(daemon: Daemon): Promise<void> {
  const client = await NbdClient.connect(daemon.nbd.host, daemon.nbd.port, 'volrep');
  await client.close();
}
