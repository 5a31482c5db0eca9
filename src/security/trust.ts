/**
 * Whom a node accepts as its peer on the replication link: certificates pinned by fingerprint
 * (`--allow-peer` on the secondary, `--peer-fingerprint` on the primary), or any certificate a
 * given CA signed (`--tls-ca`). The check runs on the TLS socket once the handshake is done and
 * before a single replication byte is read; it says why it refuses and what it saw.
 */
import type { X509Certificate } from 'node:crypto';
import type { TLSSocket } from 'node:tls';
import { fingerprintOf } from './fingerprint.js';

export interface PeerTrust {
  /** Canonical fingerprints (see fingerprint.ts) of certificates accepted as they are. */
  fingerprints: readonly string[];
  /** PEM of the CA(s) whose certificates are accepted. */
  ca?: string;
}

export type PeerVerdict =
  | { ok: true; fingerprint: string; subject: string }
  | { ok: false; reason: string; fingerprint: string | null };

/** Judges the peer of a TLS socket whose handshake is complete. */
export function verifyPeer(socket: TLSSocket, trust: PeerTrust, nowMs = Date.now()): PeerVerdict {
  const cert = socket.getPeerX509Certificate();
  if (cert === undefined) return { ok: false, reason: 'it presented no certificate', fingerprint: null };
  return verifyCertificate(cert, socket.authorized, socket.authorizationError, trust, nowMs);
}

/** The same judgement from the parts (for tests): `caVerified` is what TLS said of the chain. */
export function verifyCertificate(
  cert: X509Certificate,
  caVerified: boolean,
  caError: Error | string | null | undefined,
  trust: PeerTrust,
  nowMs: number,
): PeerVerdict {
  const fingerprint = fingerprintOf(cert);
  const from = Date.parse(cert.validFrom);
  const to = Date.parse(cert.validTo);
  if (!(nowMs >= from))
    return { ok: false, reason: `its certificate is not valid before ${cert.validFrom}`, fingerprint };
  if (!(nowMs <= to)) return { ok: false, reason: `its certificate expired on ${cert.validTo}`, fingerprint };
  if (trust.fingerprints.includes(fingerprint)) return { ok: true, fingerprint, subject: cert.subject };
  if (trust.ca !== undefined) {
    if (caVerified) return { ok: true, fingerprint, subject: cert.subject };
    return {
      ok: false,
      reason: `its certificate is not signed by the --tls-ca (${String(caError)})`,
      fingerprint,
    };
  }
  return {
    ok: false,
    reason: 'its certificate fingerprint is not one this node was told to trust',
    fingerprint,
  };
}
