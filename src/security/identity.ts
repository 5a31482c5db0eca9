/**
 * A node's identity: a private key and a self-signed X.509 certificate in its metadata directory
 * (`identity.key`, mode 0600; `identity.crt`), made by `volrep create` or, for a directory made
 * before identities existed, on first start. Peers pin its SHA-256 fingerprint (`volrep
 * identity` prints it), the way Syncthing pairs devices; a fleet with a CA passes its own
 * certificate and key instead (`--tls-cert`, `--tls-key`).
 *
 * A key file readable by group or others is refused, with the command that fixes it. Keys never
 * leave this module except into a TLS context: they are not logged or shown in status.
 */
import { createPrivateKey, randomUUID, X509Certificate } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import selfsigned from 'selfsigned';
import { errnoCode, VolrepError } from '../errors.js';
import { fingerprintOf } from './fingerprint.js';

export const IDENTITY_KEY_FILE = 'identity.key';
export const IDENTITY_CERT_FILE = 'identity.crt';
/** A pinned self-signed certificate should outlive the pair: 20 years. */
const IDENTITY_VALIDITY_DAYS = 20 * 365;

export interface Identity {
  /** PEM. */
  cert: string;
  /** PEM (PKCS #8). */
  key: string;
  fingerprint: string;
  /** Where it came from, for messages. */
  certFile: string;
  keyFile: string;
}

/** Generates a key pair and a self-signed certificate (EC P-256, SHA-256) for `commonName`. */
export async function generateIdentityPem(
  commonName: string,
  validity: { notBefore?: Date; notAfter?: Date } = {},
  signer?: { key: string; cert: string },
): Promise<{ key: string; cert: string }> {
  const notBefore = validity.notBefore ?? new Date(Date.now() - 60_000);
  const notAfter = validity.notAfter ?? new Date(notBefore.getTime() + IDENTITY_VALIDITY_DAYS * 86_400_000);
  const pems = await selfsigned.generate([{ name: 'commonName', value: commonName }], {
    keyType: 'ec',
    curve: 'P-256',
    algorithm: 'sha256',
    notBeforeDate: notBefore,
    notAfterDate: notAfter,
    extensions: [
      { name: 'basicConstraints', cA: false },
      { name: 'keyUsage', digitalSignature: true, keyEncipherment: true },
      { name: 'extKeyUsage', serverAuth: true, clientAuth: true },
    ],
    ...(signer ? { ca: signer } : {}),
  });
  return { key: pems.private, cert: pems.cert };
}

/** Writes a new identity into `metaDir` (the key 0600, created exclusively: never replaced silently). */
export async function createIdentity(metaDir: string, commonName: string): Promise<Identity> {
  const { key, cert } = await generateIdentityPem(commonName);
  const keyFile = path.join(metaDir, IDENTITY_KEY_FILE);
  const certFile = path.join(metaDir, IDENTITY_CERT_FILE);
  await writePrivate(keyFile, key);
  await writeFileSynced(certFile, cert, 0o644);
  return { key, cert, fingerprint: fingerprintOf(cert), certFile, keyFile };
}

/**
 * Loads a certificate and its key. Refuses a key file readable by group or others, a key that is
 * not the certificate's, and unreadable files, each with a message that says what to do.
 */
export async function loadIdentity(certFile: string, keyFile: string): Promise<Identity> {
  await checkPrivate(keyFile);
  const cert = await readText(certFile, 'certificate');
  const key = await readText(keyFile, 'private key');
  let x509: X509Certificate;
  try {
    x509 = new X509Certificate(cert);
  } catch (err) {
    throw new VolrepError(
      'VOLREP_ERR_META',
      `${certFile} is not a PEM certificate: ${(err as Error).message}`,
    );
  }
  try {
    if (!x509.checkPrivateKey(createPrivateKey(key))) {
      throw new VolrepError('VOLREP_ERR_META', `${keyFile} is not the private key of ${certFile}`);
    }
  } catch (err) {
    if (err instanceof VolrepError) throw err;
    throw new VolrepError(
      'VOLREP_ERR_META',
      `${keyFile} is not a PEM private key: ${(err as Error).message}`,
    );
  }
  return { cert, key, fingerprint: fingerprintOf(x509), certFile, keyFile };
}

/**
 * The identity in `metaDir`, made now if the directory has none yet (one made before identities
 * existed); `onCreated` is told so that the daemon can say it in its log.
 */
export async function ensureIdentity(
  metaDir: string,
  commonName: string,
  onCreated?: (identity: Identity) => void,
): Promise<Identity> {
  const keyFile = path.join(metaDir, IDENTITY_KEY_FILE);
  const certFile = path.join(metaDir, IDENTITY_CERT_FILE);
  const haveKey = await exists(keyFile);
  const haveCert = await exists(certFile);
  if (!haveKey && !haveCert) {
    const identity = await createIdentity(metaDir, commonName);
    onCreated?.(identity);
    return identity;
  }
  if (haveKey !== haveCert) {
    throw new VolrepError(
      'VOLREP_ERR_META_MISSING',
      `${haveKey ? certFile : keyFile} is missing but ${haveKey ? keyFile : certFile} is there: restore it, or remove both to make a new identity (peers that pinned the old one must be told the new fingerprint)`,
    );
  }
  return loadIdentity(certFile, keyFile);
}

/** The identity `volrep create` put in `metaDir`. */
export function nodeIdentity(metaDir: string): Promise<Identity> {
  return loadIdentity(path.join(metaDir, IDENTITY_CERT_FILE), path.join(metaDir, IDENTITY_KEY_FILE));
}

/** The common name of a node's certificate: what it is, not a secret. */
export function identityName(role: string, volumeId: string): string {
  return `volrep ${role} ${volumeId}`;
}

async function checkPrivate(keyFile: string): Promise<void> {
  let mode: number;
  try {
    mode = (await fsp.stat(keyFile)).mode;
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') throw new VolrepError('VOLREP_ERR_NOT_FOUND', `${keyFile} not found`);
    throw new VolrepError('VOLREP_ERR_META', `${keyFile}: ${(err as Error).message}`);
  }
  if ((mode & 0o077) !== 0) {
    throw new VolrepError(
      'VOLREP_ERR_META',
      `${keyFile} is readable by ${mode & 0o007 ? 'others' : 'its group'} (mode ${(mode & 0o777).toString(8).padStart(4, '0')}): a private key must be private; run: chmod 600 ${keyFile}`,
    );
  }
}

async function readText(file: string, what: string): Promise<string> {
  try {
    return await fsp.readFile(file, 'utf8');
  } catch (err) {
    if (errnoCode(err) === 'ENOENT')
      throw new VolrepError('VOLREP_ERR_NOT_FOUND', `${what} ${file} not found`);
    throw new VolrepError('VOLREP_ERR_META', `${what} ${file}: ${(err as Error).message}`);
  }
}

/** Creates a file with mode 0600 from the first byte (never readable by others, not even briefly). */
async function writePrivate(file: string, text: string): Promise<void> {
  const handle = await fsp.open(file, 'wx', 0o600);
  try {
    await handle.chmod(0o600); // the umask could not widen it, but be explicit
    await handle.writeFile(text);
    await handle.sync();
  } finally {
    await handle.close();
  }
}

async function writeFileSynced(file: string, text: string, mode: number): Promise<void> {
  const temp = `${file}.tmp-${process.pid}-${randomUUID().slice(0, 8)}`;
  const handle = await fsp.open(temp, 'wx', mode);
  try {
    await handle.writeFile(text);
    await handle.sync();
  } finally {
    await handle.close();
  }
  await fsp.rename(temp, file);
}

async function exists(file: string): Promise<boolean> {
  return fsp.stat(file).then(
    () => true,
    () => false,
  );
}
