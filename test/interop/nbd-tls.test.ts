/**
 * NBD over TLS (NBD_OPT_STARTTLS) with real clients against a real `volrep primary`: qemu-io,
 * nbdinfo and nbdcopy over TLS with `--nbd-tls require`, plaintext clients refused there (and
 * nothing they tried reaching the volume); `--nbd-tls on` serving both kinds; `--nbd-tls-ca`
 * requiring a client certificate from that CA; and the flag errors. The CA, server and client
 * certificates are made here (selfsigned), as a user would make them.
 */
import assert from 'node:assert/strict';
import { randomFillSync } from 'node:crypto';
import { chmodSync, copyFileSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import tls from 'node:tls';
import selfsigned from 'selfsigned';
import * as P from '../../src/nbd/protocol.js';
import {
  assertUsageError,
  createVolumeCli,
  describeRun,
  expectFile,
  httpRequest,
  metricValue,
  qemuIo,
  type RunResult,
  run,
  sha256File,
  sha256Range,
  volrepAsync,
  waitFor,
} from '../helpers/clients.js';
import { type Daemon, needTool, startPrimary, tempDir } from '../helpers/daemon.js';
import { clientFlags, option } from '../nbd/wire.js';

const K = 1024;
const M = 1024 * 1024;
const SIZE = 32 * M;

interface Certs {
  caCert: string;
  serverCert: string;
  serverKey: string;
  /** ca-cert.pem, client-cert.pem, client-key.pem: what qemu and libnbd look for in a directory. */
  clientDir: string;
  /** ca-cert.pem only: a TLS client with no certificate of its own. */
  noCertDir: string;
  /**
   * A client certificate signed by another CA; its ca-cert.pem holds both CAs (the test CA to verify
   * the server, the other so that the client itself accepts its own certificate and sends it).
   */
  rogueDir: string;
}

/** A CA, a server certificate for 127.0.0.1 signed by it, client certificates, in `dir`. */
async function makeCerts(dir: string): Promise<Certs> {
  const base = {
    keyType: 'ec' as const,
    curve: 'P-256' as const,
    algorithm: 'sha256',
    notBeforeDate: new Date(Date.now() - 60_000),
    notAfterDate: new Date(Date.now() + 30 * 86_400_000),
  };
  const caExtensions = [
    { name: 'basicConstraints' as const, cA: true, critical: true },
    { name: 'keyUsage' as const, keyCertSign: true, cRLSign: true, digitalSignature: true, critical: true },
  ];
  const ca = await selfsigned.generate([{ name: 'commonName', value: 'volrep test CA' }], {
    ...base,
    extensions: caExtensions,
  });
  const otherCa = await selfsigned.generate([{ name: 'commonName', value: 'some other CA' }], {
    ...base,
    extensions: caExtensions,
  });
  const server = await selfsigned.generate([{ name: 'commonName', value: 'localhost' }], {
    ...base,
    ca: { key: ca.private, cert: ca.cert },
    extensions: [
      { name: 'basicConstraints', cA: false },
      { name: 'keyUsage', digitalSignature: true, keyEncipherment: true },
      { name: 'extKeyUsage', serverAuth: true },
      {
        name: 'subjectAltName',
        altNames: [
          { type: 7, ip: '127.0.0.1' },
          { type: 2, value: 'localhost' },
        ],
      },
    ],
  });
  const clientCert = (signer: { private: string; cert: string }) =>
    selfsigned.generate([{ name: 'commonName', value: 'client' }], {
      ...base,
      ca: { key: signer.private, cert: signer.cert },
      extensions: [
        { name: 'basicConstraints', cA: false },
        { name: 'keyUsage', digitalSignature: true, keyEncipherment: true },
        { name: 'extKeyUsage', clientAuth: true },
      ],
    });
  const client = await clientCert(ca);
  const rogue = await clientCert(otherCa);

  const writeKey = (file: string, pem: string) => {
    writeFileSync(file, pem, { mode: 0o600 });
    chmodSync(file, 0o600);
  };
  const certs: Certs = {
    caCert: path.join(dir, 'ca-cert.pem'),
    serverCert: path.join(dir, 'server-cert.pem'),
    serverKey: path.join(dir, 'server-key.pem'),
    clientDir: path.join(dir, 'client'),
    noCertDir: path.join(dir, 'no-client-cert'),
    rogueDir: path.join(dir, 'rogue-client'),
  };
  writeFileSync(certs.caCert, ca.cert);
  writeFileSync(certs.serverCert, server.cert);
  writeKey(certs.serverKey, server.private);
  for (const [clientDir, pems] of [
    [certs.clientDir, client],
    [certs.noCertDir, undefined],
    [certs.rogueDir, rogue],
  ] as const) {
    mkdirSync(clientDir);
    const trusted = clientDir === certs.rogueDir ? ca.cert + otherCa.cert : ca.cert;
    writeFileSync(path.join(clientDir, 'ca-cert.pem'), trusted);
    if (pems === undefined) continue;
    writeFileSync(path.join(clientDir, 'client-cert.pem'), pems.cert);
    writeKey(path.join(clientDir, 'client-key.pem'), pems.private);
  }
  return certs;
}

/** The libnbd URI of the export over TLS, trusting (and presenting) what `dir` holds. */
function nbdsUri(daemon: Daemon, dir: string): string {
  return `nbds://${daemon.nbd.host}:${daemon.nbd.port}/volrep?tls-certificates=${dir}`;
}

/** qemu-io over TLS: an x509 credentials object from `dir` (ca-cert.pem, client-*.pem). */
function qemuIoTls(daemon: Daemon, dir: string, commands: string[]): Promise<RunResult> {
  const args = [
    '--object',
    `tls-creds-x509,id=tls0,endpoint=client,dir=${dir}`,
    '--image-opts',
    `driver=nbd,host=${daemon.nbd.host},port=${daemon.nbd.port},export=volrep,tls-creds=tls0`,
  ];
  for (const c of commands) args.push('-c', c);
  return run('qemu-io', args);
}

/** qemu-io succeeded, with `wrote` write lines and `read` read lines and no pattern mismatch. */
function expectQemuOk(r: RunResult, what: string, done: { wrote: number; read: number }): void {
  assert.equal(r.code, 0, describeRun(what, r));
  assert.doesNotMatch(r.stdout + r.stderr, /Pattern verification failed|error|failed/i, describeRun(what, r));
  for (const [verb, count] of Object.entries(done)) {
    const lines = r.stdout
      .split('\n')
      .filter((l) => new RegExp(`^${verb} \\d+/\\d+ bytes at offset \\d+$`).test(l));
    assert.equal(lines.length, count, `${what}: expected ${count} '${verb}' lines\n${r.stdout}`);
  }
}

/** The command failed (non-zero exit, not killed) and its output says `pattern`. */
function expectRefused(r: RunResult, what: string, pattern: RegExp): void {
  assert.notEqual(r.code, 0, describeRun(`${what} should have been refused`, r));
  assert.equal(r.signal, null, describeRun(`${what} was killed (timed out?)`, r));
  assert.match(r.stdout + r.stderr, pattern, describeRun(what, r));
}

async function nbdinfoJson(uri: string): Promise<{ protocol: string; TLS?: boolean; exports: Json[] }> {
  const r = await run('nbdinfo', ['--json', uri]);
  assert.equal(r.code, 0, describeRun(`nbdinfo --json ${uri}`, r));
  return JSON.parse(r.stdout);
}
// biome-ignore lint/suspicious/noExplicitAny: nbdinfo's JSON is checked field by field
type Json = any;

/** Successful NBD requests of `command` (write, read, ...) the daemon counted. */
async function okRequests(daemon: Daemon, command: string): Promise<number> {
  const text = (await httpRequest(daemon.http!, '/metrics')).body;
  return metricValue(text, 'volrep_nbd_requests_total', { command, result: 'ok' }) ?? 0;
}

/** Reads exact byte counts from a stream; fails once it errors or closes. */
function exactReader(stream: net.Socket) {
  let buf = Buffer.alloc(0);
  let failed: Error | undefined;
  let wake: (() => void) | undefined;
  const onData = (chunk: Buffer) => {
    buf = Buffer.concat([buf, chunk]);
    wake?.();
  };
  const onError = (err: Error) => {
    failed ??= err;
    wake?.();
  };
  const onClose = () => onError(new Error('connection closed'));
  stream.on('data', onData).on('error', onError).on('close', onClose);
  return {
    async read(n: number): Promise<Buffer> {
      while (buf.length < n) {
        if (failed) throw failed;
        await new Promise<void>((resolve) => (wake = resolve));
        wake = undefined;
      }
      const out = buf.subarray(0, n);
      buf = buf.subarray(n);
      return out;
    },
    /** Stops reading (before the stream is handed to TLS); nothing may be buffered. */
    detach(): void {
      stream.off('data', onData).off('error', onError).off('close', onClose);
      stream.pause();
      assert.equal(buf.length, 0, 'bytes after the STARTTLS reply');
    },
  };
}

/**
 * A minimal NBD client that always presents its certificate: negotiates STARTTLS, upgrades with
 * Node's TLS (which sends the certificate whatever CAs the server names), then sends NBD_OPT_LIST
 * and reads the reply. With TLS 1.3 the server checks the client's certificate after the client
 * considers the handshake done, so a refusal shows up as the reply that never comes.
 */
async function optListOverTls(
  daemon: Daemon,
  pems: { ca: string; cert: string; key: string },
): Promise<{ ok: true } | { ok: false; error: string }> {
  const raw = net.connect(daemon.nbd.port, daemon.nbd.host);
  const timer = setTimeout(() => raw.destroy(new Error('timed out')), 20_000);
  let secure: tls.TLSSocket | undefined;
  try {
    // Up to the upgrade every failure is the test's (or a server bug), never a refusal.
    const plain = exactReader(raw);
    const greeting = await plain.read(18);
    assert.equal(greeting.readBigUInt64BE(0), P.NBD_MAGIC);
    raw.write(clientFlags(P.CLIENT_FLAG_FIXED_NEWSTYLE | P.CLIENT_FLAG_NO_ZEROES));
    raw.write(option(P.OPT_STARTTLS));
    const reply = await plain.read(20);
    assert.equal(reply.readUInt32BE(12), P.REP_ACK, 'STARTTLS must be acknowledged');
    plain.detach();
    const upgraded = tls.connect({ socket: raw, servername: 'localhost', ...pems });
    secure = upgraded;
    try {
      const overTls = exactReader(upgraded);
      await new Promise<void>((resolve, reject) => {
        upgraded.once('secureConnect', resolve);
        upgraded.once('error', reject);
      });
      upgraded.write(option(P.OPT_LIST));
      const header = await overTls.read(20);
      assert.equal(header.readBigUInt64BE(0), P.OPTION_REPLY_MAGIC);
      return { ok: true };
    } catch (err) {
      return { ok: false, error: (err as Error).message };
    }
  } finally {
    clearTimeout(timer);
    secure?.destroy();
    raw.destroy();
  }
}

function tlsFlags(certs: Certs, mode: 'on' | 'require', withCa = false): string[] {
  const flags = ['--nbd-tls', mode, '--nbd-tls-cert', certs.serverCert, '--nbd-tls-key', certs.serverKey];
  if (withCa) flags.push('--nbd-tls-ca', certs.caCert);
  return flags;
}

const skip =
  needTool('qemu-io', 'qemu-utils') ?? needTool('nbdinfo', 'libnbd-bin') ?? needTool('nbdcopy', 'libnbd-bin');

describe('NBD over TLS with real clients', { skip, timeout: 300_000 }, () => {
  let tmp: ReturnType<typeof tempDir>;
  let certs: Certs;
  const daemons: Daemon[] = [];

  before(async () => {
    tmp = tempDir('volrep-nbdtls-');
    certs = await makeCerts(tmp.dir);
    assert.equal(statSync(certs.serverKey).mode & 0o777, 0o600);
  });

  after(async () => {
    for (const d of daemons) await d.kill();
    tmp?.cleanup();
  });

  async function serve(name: string, flags: string[]): Promise<{ daemon: Daemon; volume: string }> {
    const volume = createVolumeCli(tmp.dir, name, '32M');
    const daemon = await startPrimary(volume, { http: true, extra: flags });
    daemons.push(daemon);
    return { daemon, volume };
  }

  describe('--nbd-tls require', () => {
    let daemon: Daemon;
    let volume: string;

    before(async () => {
      ({ daemon, volume } = await serve('require.img', tlsFlags(certs, 'require')));
    });

    it('qemu-io over TLS writes patterns and reads them back', async () => {
      const base = 16 * M;
      const r = await qemuIoTls(daemon, certs.clientDir, [
        `write -P 0xab ${base} ${64 * K}`,
        `write -P 0xcd ${base + 60 * K + 7} ${200 * K}`,
        `write -P 0xef ${base + 2 * M - 1} 3`,
        `read -P 0xab ${base} ${60 * K + 7}`,
        `read -P 0xcd ${base + 60 * K + 7} ${200 * K}`,
        `read -P 0 ${base + 260 * K + 7} ${64 * K}`,
        `read -P 0xef ${base + 2 * M - 1} 3`,
      ]);
      expectQemuOk(r, 'qemu-io over TLS', { wrote: 3, read: 4 });
      expectFile(volume, base, 60 * K + 7, 0xab);
      expectFile(volume, base + 60 * K + 7, 200 * K, 0xcd);
      expectFile(volume, base + 260 * K + 7, 64 * K, 0);
      expectFile(volume, base + 2 * M - 1, 3, 0xef);
    });

    it('nbdinfo over nbds:// reports TLS and the size', async () => {
      const text = await run('nbdinfo', [nbdsUri(daemon, certs.clientDir)]);
      assert.equal(text.code, 0, describeRun('nbdinfo nbds://', text));
      assert.match(text.stdout, /^protocol: newstyle-fixed with TLS/m);
      assert.match(text.stdout, new RegExp(`export-size: ${SIZE}\\b`));
      const json = await nbdinfoJson(nbdsUri(daemon, certs.clientDir));
      assert.equal(json.protocol, 'newstyle-fixed');
      assert.equal(json.TLS, true);
      assert.equal(json.exports.length, 1);
      assert.equal(json.exports[0]['export-name'], 'volrep');
      assert.equal(json.exports[0]['export-size'], SIZE);
      const size = await run('nbdinfo', ['--size', nbdsUri(daemon, certs.clientDir)]);
      assert.equal(size.stdout.trim(), String(SIZE), describeRun('nbdinfo --size nbds://', size));
    });

    it('nbdcopy over nbds:// copies a file in and out byte-identically', async () => {
      const source = path.join(tmp.dir, 'source.bin');
      const copied = path.join(tmp.dir, 'copied-out.bin');
      const data = randomFillSync(Buffer.alloc(8 * M));
      writeFileSync(source, data);
      const want = await sha256File(source);
      const into = await run('nbdcopy', ['--flush', source, nbdsUri(daemon, certs.clientDir)]);
      assert.equal(into.code, 0, describeRun('nbdcopy into nbds://', into));
      assert.equal(await sha256Range(volume, 0, 8 * M), want, 'the volume file must start with the source');
      assert.equal(statSync(volume).size, SIZE);

      const out = await run('nbdcopy', [nbdsUri(daemon, certs.clientDir), copied]);
      assert.equal(out.code, 0, describeRun('nbdcopy out of nbds://', out));
      assert.equal(statSync(copied).size, SIZE);
      assert.equal(await sha256Range(copied, 0, 8 * M), want, 'the copy must start with the source');
      assert.equal(await sha256File(copied), await sha256File(volume), 'the copy must equal the volume file');
    });

    it('plaintext qemu-io, nbdinfo and nbdcopy are refused for TLS, and write nothing', async () => {
      const before = await sha256File(volume);
      const writesBefore = await okRequests(daemon, 'write');
      const plainUri = daemon.nbd.uri;

      const q = await qemuIo(plainUri, [`write -P 0x66 ${24 * M} ${64 * K}`, `write -P 0x66 0 ${64 * K}`]);
      expectRefused(
        q,
        'plaintext qemu-io',
        /server reported: this server requires TLS: send NBD_OPT_STARTTLS first/,
      );
      assert.match(q.stderr, /TLS negotiation required before option 7 \(go\)/);

      // nbdinfo's own wording depends on its mode: --size says it, the default (opt mode) says
      // "Operation not supported" and shows the server's message only in libnbd's debug output.
      const size = await run('nbdinfo', ['--size', plainUri]);
      expectRefused(size, 'plaintext nbdinfo --size', /server requires TLS encryption first/);
      const info = await run('nbdinfo', [plainUri], { env: { ...process.env, LIBNBD_DEBUG: '1' } });
      expectRefused(info, 'plaintext nbdinfo', /server error message: this server requires TLS/);
      assert.match(info.stdout, /without TLS/);

      const junk = path.join(tmp.dir, 'junk.bin');
      writeFileSync(junk, Buffer.alloc(M, 0x99));
      const copy = await run('nbdcopy', [junk, plainUri]);
      expectRefused(copy, 'plaintext nbdcopy', /requires TLS/);

      assert.equal(await okRequests(daemon, 'write'), writesBefore, 'no write may have been served');
      assert.equal(await sha256File(volume), before, 'the volume file must be unchanged');
      expectFile(volume, 24 * M, 64 * K, 0);
    });
  });

  describe('--nbd-tls on', () => {
    let daemon: Daemon;
    let volume: string;

    before(async () => {
      ({ daemon, volume } = await serve('on.img', tlsFlags(certs, 'on')));
    });

    it('serves a TLS client and a plaintext client, each seeing what the other wrote', async () => {
      const viaTls = await qemuIoTls(daemon, certs.clientDir, [
        `write -P 0x31 ${M} ${128 * K}`,
        `read -P 0x31 ${M} ${128 * K}`,
      ]);
      expectQemuOk(viaTls, 'qemu-io over TLS', { wrote: 1, read: 1 });
      const plain = await qemuIo(daemon.nbd.uri, [
        `read -P 0x31 ${M} ${128 * K}`,
        `write -P 0x32 ${2 * M} ${128 * K}`,
        `read -P 0x32 ${2 * M} ${128 * K}`,
      ]);
      expectQemuOk(plain, 'plaintext qemu-io', { wrote: 1, read: 2 });
      const back = await qemuIoTls(daemon, certs.clientDir, [`read -P 0x32 ${2 * M} ${128 * K}`]);
      expectQemuOk(back, 'qemu-io over TLS, reading the plaintext write', { wrote: 0, read: 1 });
      expectFile(volume, M, 128 * K, 0x31);
      expectFile(volume, 2 * M, 128 * K, 0x32);
    });

    it('nbdinfo says with or without TLS, as the client chose', async () => {
      const tls = await run('nbdinfo', [nbdsUri(daemon, certs.clientDir)]);
      assert.equal(tls.code, 0, describeRun('nbdinfo nbds://', tls));
      assert.match(tls.stdout, /^protocol: newstyle-fixed with TLS/m);
      assert.match(tls.stdout, new RegExp(`export-size: ${SIZE}\\b`));
      const plain = await run('nbdinfo', [daemon.nbd.uri]);
      assert.equal(plain.code, 0, describeRun('nbdinfo nbd://', plain));
      assert.match(plain.stdout, /^protocol: newstyle-fixed without TLS/m);
      assert.match(plain.stdout, new RegExp(`export-size: ${SIZE}\\b`));
    });
  });

  describe('--nbd-tls require --nbd-tls-ca', () => {
    let daemon: Daemon;
    let volume: string;

    before(async () => {
      ({ daemon, volume } = await serve('ca.img', tlsFlags(certs, 'require', true)));
    });

    it('a client with a certificate from the CA works', async () => {
      const r = await qemuIoTls(daemon, certs.clientDir, [
        `write -P 0x41 ${4 * M} ${64 * K}`,
        `read -P 0x41 ${4 * M} ${64 * K}`,
      ]);
      expectQemuOk(r, 'qemu-io with a client certificate', { wrote: 1, read: 1 });
      expectFile(volume, 4 * M, 64 * K, 0x41);
      const info = await run('nbdinfo', [nbdsUri(daemon, certs.clientDir)]);
      assert.equal(info.code, 0, describeRun('nbdinfo with a client certificate', info));
      assert.match(info.stdout, /^protocol: newstyle-fixed with TLS/m);
    });

    it('a TLS client with no client certificate, or one from another CA, is refused by the server', async () => {
      const before = await sha256File(volume);
      const writesBefore = await okRequests(daemon, 'write');
      /** The daemon's "nbd TLS client refused" log lines: each refusal must add one. */
      const failures = () =>
        daemon
          .stderr()
          .split('\n')
          .filter((l) => l.includes('"nbd TLS client refused"'));
      const cases = [
        {
          dir: certs.noCertDir,
          what: 'no client certificate',
          reason: /the client presented no certificate/,
        },
        // gnutls (qemu, libnbd) sends only a certificate whose issuer is among the CAs the server
        // names in its CertificateRequest, so this client sends none either; the raw client in the
        // next test does send one.
        { dir: certs.rogueDir, what: 'a client certificate from another CA', reason: /certificate/ },
      ];
      for (const { dir, what, reason } of cases) {
        const seen = failures().length;
        // The server finishes the handshake, then judges the certificate and closes: the client
        // reports a TLS alert or a closed TLS channel, depending on when it next reads.
        const q = await qemuIoTls(daemon, dir, [`write -P 0x42 ${6 * M} ${64 * K}`]);
        expectRefused(q, `qemu-io over TLS with ${what}`, /TLS|gnutls/);
        const info = await run('nbdinfo', [nbdsUri(daemon, dir)]);
        expectRefused(info, `nbdinfo over TLS with ${what}`, /TLS|gnutls/);
        // Refused by the server (the client got as far as sending its certificate, or none).
        await waitFor(() => failures().length >= seen + 2, `two TLS refusals logged for ${what}`);
        for (const line of failures().slice(seen)) assert.match(line, reason, line);
      }
      assert.equal(await okRequests(daemon, 'write'), writesBefore, 'no write may have been served');
      assert.equal(await sha256File(volume), before, 'the volume file must be unchanged');
      expectFile(volume, 6 * M, 64 * K, 0);
    });

    it('the server verifies a client certificate it is sent (a raw STARTTLS client that always sends its own)', async () => {
      const pems = (dir: string) => ({
        ca: readFileSync(certs.caCert, 'utf8'),
        cert: readFileSync(path.join(dir, 'client-cert.pem'), 'utf8'),
        key: readFileSync(path.join(dir, 'client-key.pem'), 'utf8'),
      });
      const good = await optListOverTls(daemon, pems(certs.clientDir));
      assert.deepEqual(good, { ok: true }, "the test CA's client certificate must be accepted");
      const rogue = await optListOverTls(daemon, pems(certs.rogueDir));
      assert.equal(
        rogue.ok,
        false,
        'a client certificate from another CA must be refused: the server answered NBD_OPT_LIST over TLS',
      );
      await waitFor(
        () =>
          /"reason":"its certificate is not signed by the --nbd-tls-ca \([A-Z_]+\)","msg":"nbd TLS client refused"/.test(
            daemon.stderr(),
          ),
        'the refusal of the rogue certificate, with the chain error, in the log',
      );
    });
  });

  describe('flag errors: exit 2, one line', () => {
    let volume: string;

    before(() => {
      volume = createVolumeCli(tmp.dir, 'flags.img', '16M');
    });

    it('--nbd-tls require without a certificate and key', async () => {
      const r = await volrepAsync([
        'primary',
        '--volume',
        volume,
        '--nbd',
        '127.0.0.1:0',
        '--nbd-tls',
        'require',
      ]);
      assertUsageError(r, /--nbd-tls require needs --nbd-tls-cert and --nbd-tls-key/);
    });

    it('--nbd-tls-cert with --nbd-tls off', async () => {
      const r = await volrepAsync([
        'primary',
        '--volume',
        volume,
        '--nbd',
        '127.0.0.1:0',
        '--nbd-tls',
        'off',
        '--nbd-tls-cert',
        certs.serverCert,
      ]);
      assertUsageError(r, /--nbd-tls-cert, --nbd-tls-key and --nbd-tls-ca need --nbd-tls on or require/);
    });

    it('a key file readable by others (mode 0644): the message says chmod 600', async () => {
      const looseKey = path.join(tmp.dir, 'loose-key.pem');
      copyFileSync(certs.serverKey, looseKey);
      chmodSync(looseKey, 0o644);
      const r = await volrepAsync([
        'primary',
        '--volume',
        volume,
        '--nbd',
        '127.0.0.1:0',
        '--nbd-tls',
        'require',
        '--nbd-tls-cert',
        certs.serverCert,
        '--nbd-tls-key',
        looseKey,
      ]);
      assertUsageError(r, /is readable by others \(mode 0644\)/);
      assert.ok(r.stderr.includes(`run: chmod 600 ${looseKey}`), r.stderr);
    });

    it('a non-loopback --nbd without --nbd-tls require or --nbd-insecure (refused before any socket)', async () => {
      const plain = await volrepAsync(['primary', '--volume', volume, '--nbd', '192.0.2.1:10809']);
      assertUsageError(
        plain,
        /^volrep: --nbd 192\.0\.2\.1:10809 is not a loopback address and NBD is not TLS-only: add --nbd-tls require with --nbd-tls-cert and --nbd-tls-key, or --nbd-insecure/,
      );
      // --nbd-tls on is not enough: a client could still choose plaintext.
      const on = await volrepAsync([
        'primary',
        '--volume',
        volume,
        '--nbd',
        '192.0.2.1:10809',
        ...tlsFlags(certs, 'on'),
      ]);
      assertUsageError(on, /is not a loopback address and NBD is not TLS-only/);
    });
  });
});
