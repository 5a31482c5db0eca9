/**
 * `volrep status --http ADDR [--json] [--watch]`: what a daemon's /status says, for a person (or
 * as JSON for scripts). With --watch it redraws every second, with a progress bar and an ETA while
 * the replica is being resynchronised.
 */
import http from 'node:http';
import { VolrepError } from '../errors.js';
import { formatHostPort, parseHostPort } from '../util/address.js';
import { formatSize } from '../util/size.js';

export interface StatusFlags {
  http: string;
  json: boolean;
  watch: boolean;
}

const REQUEST_TIMEOUT_MS = 5_000;
const WATCH_INTERVAL_MS = 1_000;
const BAR_WIDTH = 30;

type Status = Record<string, unknown> & {
  role?: string;
  volume?: { path: string; id: string; size: number; regionSize: number };
  nbd?: { address: string; connections: number };
  dirtyRegions?: number;
  dirtyBytes?: number;
  pendingUpdates?: number;
  pendingBytes?: number;
  log?: { usedBytes: number; capacityBytes: number; activeTransactions: number };
  peer?: {
    address: string | null;
    state: string;
    tls?: boolean;
    fingerprint?: string | null;
    self?: string | null;
  };
  /** The secondary's own fingerprint and TLS (the primary's are in peer.self and peer.tls). */
  tls?: boolean;
  fingerprint?: string | null;
  resync?: { totalBytes: number; doneBytes: number; bytesPerSecond: number };
  replica?: { consistent: boolean; lastAckedUpdate: number };
  lastAppliedUpdate?: number;
  consistent?: boolean;
  generation?: { current: string | null; base: string | null };
  peerGeneration?: { current: string | null; base: string | null } | null;
  handshake?: { decision: string | null; at: string | null; summary: string };
};

/** A generation id in short (its first 8 hex digits), and its base while it holds writes made apart. */
function generationLine(g: { current: string | null; base: string | null }): string {
  const short = (id: string | null) =>
    id === null ? 'none' : id.startsWith('legacy-') ? 'legacy' : id.slice(0, 8);
  return g.base === null ? short(g.current) : `${short(g.current)} (wrote apart since ${short(g.base)})`;
}

export async function runStatus(flags: StatusFlags): Promise<void> {
  const address = parseHostPort(flags.http, '--http');
  const url = `http://${formatHostPort(address)}/status`;
  if (!flags.watch) {
    const status = await fetchStatus(url);
    process.stdout.write(flags.json ? `${JSON.stringify(status, null, 2)}\n` : render(status));
    return;
  }
  for (;;) {
    let text: string;
    try {
      const status = await fetchStatus(url);
      text = flags.json ? `${JSON.stringify(status)}\n` : render(status);
    } catch (err) {
      text = `${(err as Error).message}\n`;
    }
    // Clear the screen and home the cursor, then draw: a redraw, not a scroll.
    process.stdout.write(flags.json ? text : `\x1b[2J\x1b[H${new Date().toISOString()}\n${text}`);
    await new Promise((resolve) => setTimeout(resolve, WATCH_INTERVAL_MS));
  }
}

function fetchStatus(url: string): Promise<Status> {
  return new Promise((resolve, reject) => {
    const req = http.get(url, { timeout: REQUEST_TIMEOUT_MS }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => {
        body += chunk;
      });
      res.on('end', () => {
        if (res.statusCode !== 200)
          return reject(new VolrepError('VOLREP_ERR_IO', `${url}: HTTP ${res.statusCode}`));
        try {
          resolve(JSON.parse(body) as Status);
        } catch {
          reject(new VolrepError('VOLREP_ERR_IO', `${url}: not a volrep status (invalid JSON)`));
        }
      });
    });
    req.on('timeout', () => req.destroy(new Error('timed out')));
    req.on('error', (err) =>
      reject(
        new VolrepError(
          'VOLREP_ERR_IO',
          `cannot reach ${url}: ${err.message} (is the daemon running with --http?)`,
        ),
      ),
    );
  });
}

/** A person's view of a status: one fact per line. */
export function render(s: Status): string {
  const lines: string[] = [];
  const v = s.volume;
  lines.push(`role        ${s.role ?? '?'}`);
  if (v)
    lines.push(
      `volume      ${v.path} (${formatSize(v.size)}, regions of ${formatSize(v.regionSize)}, id ${v.id})`,
    );
  if (s.nbd) lines.push(`nbd         ${s.nbd.address}, ${s.nbd.connections} client(s)`);
  if (s.peer) {
    const tls = s.peer.tls ?? s.tls;
    lines.push(
      `peer        ${s.peer.address ?? '-'}: ${s.peer.state}${tls === false ? ' (PLAINTEXT)' : tls ? ' (TLS)' : ''}`,
    );
    if (s.peer.fingerprint) lines.push(`peer cert   ${s.peer.fingerprint}`);
    const self = s.peer.self ?? s.fingerprint;
    if (self) lines.push(`this node   ${self}`);
  }
  if (s.dirtyRegions !== undefined) {
    lines.push(`dirty       ${s.dirtyRegions} region(s), ${human(s.dirtyBytes ?? 0)}`);
    lines.push(`in flight   ${s.pendingUpdates ?? 0} update(s), ${human(s.pendingBytes ?? 0)}`);
  }
  if (s.log) {
    lines.push(
      `log         ${human(s.log.usedBytes)} of ${human(s.log.capacityBytes)} used, ${s.log.activeTransactions} active transaction(s)`,
    );
  }
  if (s.replica) {
    const linked = s.peer?.state === 'connected' || s.peer?.state === 'resyncing';
    const state = !linked
      ? 'state unknown while disconnected'
      : s.replica.consistent
        ? 'consistent'
        : 'INCONSISTENT (resync in progress)';
    lines.push(`replica     ${state}, acked through update ${s.replica.lastAckedUpdate}`);
  }
  if (s.lastAppliedUpdate !== undefined) {
    lines.push(
      `replica     ${s.consistent ? 'consistent' : 'INCONSISTENT (resync in progress)'}, durable through update ${s.lastAppliedUpdate}`,
    );
  }
  if (s.peer?.state === 'resyncing' && s.resync) lines.push(`resync      ${progress(s.resync)}`);
  if (s.generation) lines.push(`generation  ${generationLine(s.generation)}`);
  if (s.peerGeneration) lines.push(`peer gen.   ${generationLine(s.peerGeneration)}`);
  if (s.handshake) lines.push(`handshake   ${s.handshake.summary}`);
  return `${lines.join('\n')}\n`;
}

function progress(r: { totalBytes: number; doneBytes: number; bytesPerSecond: number }): string {
  const fraction = r.totalBytes > 0 ? Math.min(1, r.doneBytes / r.totalBytes) : 1;
  const filled = Math.round(fraction * BAR_WIDTH);
  const bar = `[${'#'.repeat(filled)}${'.'.repeat(BAR_WIDTH - filled)}]`;
  const eta =
    r.bytesPerSecond > 0 ? `ETA ${Math.ceil((r.totalBytes - r.doneBytes) / r.bytesPerSecond)} s` : 'ETA -';
  return `${bar} ${(fraction * 100).toFixed(1)}% ${human(r.doneBytes)} / ${human(r.totalBytes)}, ${human(r.bytesPerSecond)}/s, ${eta}`;
}

function human(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${unit === 0 ? value : value.toFixed(1)} ${units[unit]}`;
}
