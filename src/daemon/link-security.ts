/**
 * How a daemon's replication link is secured, from its flags: TLS 1.3 with the node's identity
 * (or a certificate of the user's own) and the peers it trusts — the default, loopback included —
 * or plaintext, only when asked for on both sides and only on loopback.
 */
import type { Logger } from 'pino';
import { VolrepError } from '../errors.js';
import type { LinkSecurity } from '../io/tls.js';
import { ensureIdentity, loadIdentity } from '../security/identity.js';
import type { PeerTrust } from '../security/trust.js';
import { formatHostPort, type HostPort } from '../util/address.js';
import { isLoopback } from '../util/loopback.js';

export type LinkSecurityOptions =
  | {
      mode: 'tls';
      trust: PeerTrust;
      /** A certificate of the user's own instead of the node identity in the metadata directory. */
      own?: { certFile: string; keyFile: string };
    }
  | { mode: 'insecure-plaintext' };

/** The TLS setup for the link, or undefined for plaintext (refused on anything but loopback). */
export async function resolveLinkSecurity(
  opts: LinkSecurityOptions,
  metaDir: string,
  commonName: string,
  address: HostPort,
  flag: string,
  logger: Logger,
): Promise<LinkSecurity | undefined> {
  if (opts.mode === 'insecure-plaintext') {
    if (!isLoopback(address.host)) {
      throw new VolrepError(
        'VOLREP_ERR_ADDRESS',
        `--insecure-plaintext with ${flag} ${formatHostPort(address)}: plaintext replication is refused on anything but loopback; drop --insecure-plaintext (TLS is the default)`,
      );
    }
    return undefined; // the daemon warns once it is up
  }
  if (opts.trust.fingerprints.length === 0 && opts.trust.ca === undefined) {
    throw new VolrepError('VOLREP_ERR_USAGE', 'the replication link needs to know whom to trust');
  }
  const identity = opts.own
    ? await loadIdentity(opts.own.certFile, opts.own.keyFile)
    : await ensureIdentity(metaDir, commonName, (made) =>
        logger.info(
          { fingerprint: made.fingerprint, cert: made.certFile },
          'made a new node identity for this metadata directory (it had none)',
        ),
      );
  return { identity, trust: opts.trust };
}
