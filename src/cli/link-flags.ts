/** The replication link's security flags, shared by `volrep primary` and `volrep secondary`. */
import { promises as fsp } from 'node:fs';
import type { LinkSecurityOptions } from '../daemon/link-security.js';
import { errnoCode, VolrepError } from '../errors.js';
import { parseFingerprint } from '../security/fingerprint.js';

export interface LinkFlags {
  /** Primary: the secondary's certificate fingerprint(s). Secondary: the primaries it accepts. */
  fingerprints: string[];
  tlsCa?: string;
  tlsCert?: string;
  tlsKey?: string;
  insecurePlaintext: boolean;
}

/** Commander's collector for a repeatable flag. */
export function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

export async function linkOptions(
  flags: LinkFlags,
  role: 'primary' | 'secondary',
): Promise<LinkSecurityOptions> {
  const fpFlag = role === 'primary' ? '--peer-fingerprint' : '--allow-peer';
  const usage = (why: string) => new VolrepError('VOLREP_ERR_USAGE', why);
  if (flags.insecurePlaintext) {
    const also = [
      flags.fingerprints.length > 0 && fpFlag,
      flags.tlsCa && '--tls-ca',
      flags.tlsCert && '--tls-cert',
      flags.tlsKey && '--tls-key',
    ].filter(Boolean);
    if (also.length > 0)
      throw usage(`--insecure-plaintext turns TLS off: it cannot go with ${also.join(', ')}`);
    return { mode: 'insecure-plaintext' };
  }
  const fingerprints: string[] = [];
  for (const text of flags.fingerprints) {
    const fp = parseFingerprint(text);
    if (fp === undefined)
      throw usage(
        `${fpFlag} '${text}' is not a SHA-256 certificate fingerprint (as 'volrep identity' prints it: sha256: and 64 hex digits)`,
      );
    fingerprints.push(fp);
  }
  if ((flags.tlsCert === undefined) !== (flags.tlsKey === undefined))
    throw usage('--tls-cert and --tls-key go together');
  const ca = flags.tlsCa === undefined ? undefined : await readCa(flags.tlsCa);
  if (fingerprints.length === 0 && ca === undefined) {
    throw usage(
      role === 'primary'
        ? "--peer needs the secondary's identity: --peer-fingerprint <fingerprint> (run 'volrep identity --volume <replica>' on the secondary) or --tls-ca FILE; or --insecure-plaintext on loopback"
        : "volrep secondary needs to know which primary to accept: --allow-peer <fingerprint> (run 'volrep identity --volume <volume>' on the primary) or --tls-ca FILE; or --insecure-plaintext on loopback",
    );
  }
  return {
    mode: 'tls',
    trust: { fingerprints, ca },
    own: flags.tlsCert && flags.tlsKey ? { certFile: flags.tlsCert, keyFile: flags.tlsKey } : undefined,
  };
}

async function readCa(file: string): Promise<string> {
  try {
    const text = await fsp.readFile(file, 'utf8');
    if (!text.includes('-----BEGIN CERTIFICATE-----'))
      throw new VolrepError('VOLREP_ERR_USAGE', `--tls-ca ${file} holds no PEM certificate`);
    return text;
  } catch (err) {
    if (err instanceof VolrepError) throw err;
    if (errnoCode(err) === 'ENOENT')
      throw new VolrepError('VOLREP_ERR_NOT_FOUND', `--tls-ca ${file} not found`);
    throw new VolrepError('VOLREP_ERR_USAGE', `--tls-ca ${file}: ${(err as Error).message}`);
  }
}
