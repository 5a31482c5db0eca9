/**
 * Certificate fingerprints as users paste them: `sha256:` and 64 hex digits. Colons and case are
 * forgiven on input (`AB:CD:…` as openssl and node print them); output is one canonical form.
 */
import { X509Certificate } from 'node:crypto';

const PREFIX = 'sha256:';

/** The canonical form of a fingerprint, or undefined if `text` is not a SHA-256 fingerprint. */
export function parseFingerprint(text: string): string | undefined {
  let t = text.trim();
  if (t.toLowerCase().startsWith(PREFIX)) t = t.slice(PREFIX.length);
  t = t.replace(/:/g, '');
  if (!/^[0-9a-fA-F]{64}$/.test(t)) return undefined;
  return `${PREFIX}${t.toUpperCase()}`;
}

/** The canonical fingerprint of a certificate (PEM text or parsed). */
export function fingerprintOf(cert: string | Buffer | X509Certificate): string {
  const x509 = cert instanceof X509Certificate ? cert : new X509Certificate(cert);
  return parseFingerprint(x509.fingerprint256)!;
}
