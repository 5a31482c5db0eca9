/**
 * The data-generation part of /status, shared by both daemons: this side's generation, the
 * peer's, and what the last handshake decided, in words.
 */
import { type Generations, type HandshakeOutcome, shortGeneration } from '../replication/generations.js';

export interface GenerationStatus {
  /** This side's generation (and the one both last shared, while it holds writes made apart). */
  generation: { current: string | null; base: string | null };
  /** The peer's generation at the last handshake (null before any). */
  peerGeneration: { current: string | null; base: string | null } | null;
  handshake: {
    decision: HandshakeOutcome | null;
    /** Wall-clock time of the last handshake (ISO 8601). */
    at: string | null;
    /** In words: `in sync`, `resyncing 12 MiB to the peer`, `split brain since …: run …`. */
    summary: string;
  };
  splitBrain: boolean;
}

export interface HandshakeSeen {
  decision: HandshakeOutcome;
  /** performance.now() milliseconds. */
  atMs: number;
  peer: Generations | null;
  reason?: string;
}

const pick = (g: Generations) => ({ current: g.current, base: g.base });

/**
 * `progress`: on the primary, bytes still to resync while connected (undefined while not
 * streaming); on the secondary, whether the replica is consistent and the link up.
 */
export function generationStatus(
  own: Generations,
  seen: HandshakeSeen | null,
  progress:
    | { side: 'primary'; connected: boolean; resyncBytesLeft: number }
    | { side: 'secondary'; connected: boolean; consistent: boolean },
): GenerationStatus {
  const at = seen === null ? null : new Date(Date.now() - (performance.now() - seen.atMs)).toISOString();
  let summary: string;
  if (seen === null) summary = progress.connected ? 'connected' : 'no handshake yet';
  else
    switch (seen.decision) {
      case 'splitBrain':
        summary = `split brain since ${at}: both sides wrote while apart (this side ${shortGeneration(own.current)}, the peer ${shortGeneration(seen.peer?.current ?? null)}); run 'volrep secondary --discard-local-changes' on the side to discard (after 'volrep demote' if it is a primary)`;
        break;
      case 'peerNewer':
        summary = `refused since ${at}: ${seen.reason ?? 'the secondary holds newer data'}`;
        break;
      case 'fullOnRequest':
      case 'unrelated':
      case 'peerIsPrimary':
        summary = `refused since ${at}: ${seen.reason ?? 'no common generation'}`;
        break;
      default:
        if (!progress.connected) summary = 'disconnected';
        else if (progress.side === 'primary')
          summary =
            progress.resyncBytesLeft > 0
              ? `resyncing ${mebibytes(progress.resyncBytesLeft)} to the peer`
              : 'in sync';
        else summary = progress.consistent ? 'in sync' : 'resyncing from the peer';
    }
  return {
    generation: pick(own),
    peerGeneration: seen?.peer ? pick(seen.peer) : null,
    handshake: { decision: seen?.decision ?? null, at, summary },
    splitBrain: seen?.decision === 'splitBrain',
  };
}

function mebibytes(bytes: number): string {
  const mib = bytes / 2 ** 20;
  return `${mib >= 10 ? Math.round(mib) : mib.toFixed(1)} MiB`;
}
