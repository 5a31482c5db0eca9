/**
 * Node identities and peer trust, in-process: the fingerprint format users paste, identity files
 * and their modes, refusals of a readable key or a key that is not the certificate's, and the
 * verdicts on a peer's certificate (pinned, unknown, expired, not yet valid, CA-signed or not).
 */
import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { chmodSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { VolrepError } from '../../src/errors.js';
import { fingerprintOf, parseFingerprint } from '../../src/security/fingerprint.js';
import { generateIdentityPem, loadIdentity, nodeIdentity } from '../../src/security/identity.js';
import { verifyCertificate } from '../../src/security/trust.js';
import { createVolume } from '../../src/volume/volume.js';
import { tempDir } from '../helpers/daemon.js';

const HEX = 'ab'.repeat(32);

describe('fingerprints', () => {
  it('accepts what openssl, node and volrep print, in one canonical form', () => {
    const canonical = `sha256:${HEX.toUpperCase()}`;
    for (const text of [
      canonical,
      HEX,
      HEX.toUpperCase(),
      `SHA256:${HEX}`,
      HEX.match(/../g)!.join(':'),
      `  ${canonical}\n`,
    ]) {
      assert.equal(parseFingerprint(text), canonical, text);
    }
    for (const bad of ['', 'sha256:', 'ab'.repeat(31), `${HEX}00`, 'sha1:'.concat(HEX), 'zz'.repeat(32)]) {
      assert.equal(parseFingerprint(bad), undefined, bad);
    }
  });
});

describe('node identity', () => {
  const tmp = tempDir('volrep-identity-');
  after(() => tmp.cleanup());

  it('volrep create makes a private key (0600) in a private directory (0700) and a certificate that matches it', async () => {
    const volumePath = path.join(tmp.dir, 'v.img');
    await createVolume({ volumePath, size: 1 << 20, logSize: 64 * 1024 });
    const metaDir = `${volumePath}.volrep`;
    assert.equal(statSync(metaDir).mode & 0o777, 0o700);
    assert.equal(statSync(path.join(metaDir, 'identity.key')).mode & 0o777, 0o600);
    const id = await nodeIdentity(metaDir);
    assert.equal(id.fingerprint, fingerprintOf(id.cert));
    assert.match(new X509Certificate(id.cert).subject, /volrep primary [0-9a-f-]{36}/);
    // --force re-creates the volume, not the node: the peer's pin stays valid.
    await createVolume({ volumePath, size: 1 << 20, logSize: 64 * 1024, force: true });
    assert.equal((await nodeIdentity(metaDir)).fingerprint, id.fingerprint);
  });

  it('refuses a key readable by group or others, saying how to fix it', async () => {
    const { key, cert } = await generateIdentityPem('t');
    const keyFile = path.join(tmp.dir, 'k.pem');
    const certFile = path.join(tmp.dir, 'c.pem');
    writeFileSync(certFile, cert);
    writeFileSync(keyFile, key, { mode: 0o600 });
    assert.equal((await loadIdentity(certFile, keyFile)).fingerprint, fingerprintOf(cert));
    for (const mode of [0o644, 0o640, 0o604]) {
      chmodSync(keyFile, mode);
      await assert.rejects(loadIdentity(certFile, keyFile), (err: unknown) => {
        assert.ok(err instanceof VolrepError && err.exitCode === 2);
        assert.match(err.message, new RegExp(`mode 0${mode.toString(8)}.*run: chmod 600 ${keyFile}`));
        return true;
      });
    }
  });

  it("refuses a key that is not the certificate's", async () => {
    const a = await generateIdentityPem('a');
    const b = await generateIdentityPem('b');
    const keyFile = path.join(tmp.dir, 'ka.pem');
    const certFile = path.join(tmp.dir, 'cb.pem');
    writeFileSync(certFile, b.cert);
    writeFileSync(keyFile, a.key, { mode: 0o600 });
    await assert.rejects(loadIdentity(certFile, keyFile), /is not the private key of/);
  });
});

describe('peer verdicts', () => {
  const now = Date.now();
  const day = 86_400_000;

  it('accepts a pinned certificate, refuses an unknown one, naming what it saw', async () => {
    const { cert } = await generateIdentityPem('peer');
    const x = new X509Certificate(cert);
    const fp = fingerprintOf(cert);
    assert.deepEqual(verifyCertificate(x, false, 'self signed', { fingerprints: [fp] }, now), {
      ok: true,
      fingerprint: fp,
      subject: x.subject,
    });
    const other = verifyCertificate(
      x,
      false,
      'self signed',
      { fingerprints: [`sha256:${HEX.toUpperCase()}`] },
      now,
    );
    assert.deepEqual(other, {
      ok: false,
      reason: 'its certificate fingerprint is not one this node was told to trust',
      fingerprint: fp,
    });
  });

  it('refuses an expired certificate and one not valid yet, even when pinned', async () => {
    const expired = await generateIdentityPem('old', {
      notBefore: new Date(now - 10 * day),
      notAfter: new Date(now - day),
    });
    const future = await generateIdentityPem('new', {
      notBefore: new Date(now + day),
      notAfter: new Date(now + 10 * day),
    });
    for (const [pem, pattern] of [
      [expired.cert, /expired on/],
      [future.cert, /not valid before/],
    ] as const) {
      const v = verifyCertificate(
        new X509Certificate(pem),
        true,
        null,
        { fingerprints: [fingerprintOf(pem)] },
        now,
      );
      assert.equal(v.ok, false);
      assert.match(v.ok ? '' : v.reason, pattern);
    }
  });

  it('with a CA: accepts what TLS verified against it, refuses what it did not', async () => {
    const { cert } = await generateIdentityPem('leaf');
    const x = new X509Certificate(cert);
    assert.equal(verifyCertificate(x, true, null, { fingerprints: [], ca: 'CA PEM' }, now).ok, true);
    const refused = verifyCertificate(
      x,
      false,
      'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
      { fingerprints: [], ca: 'CA PEM' },
      now,
    );
    assert.equal(refused.ok, false);
    assert.match(
      refused.ok ? '' : refused.reason,
      /not signed by the --tls-ca \(UNABLE_TO_VERIFY_LEAF_SIGNATURE\)/,
    );
  });
});
