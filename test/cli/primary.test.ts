/**
 * `volrep primary` as a process: refusals (missing or mismatched volume, bad metadata, locked
 * volume, address in use) as one line with exit code 2, the stale lock left by SIGKILL, and the
 * --http endpoint's /status and /metrics.
 */
import assert from 'node:assert/strict';
import { existsSync, readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { NbdClient } from '../../src/nbd/client.js';
import {
  assertUsageError,
  createVolumeCli,
  describeRun,
  httpRequest,
  metricValue,
  nbdRoundTrip,
  qemuIo,
  volrepAsync,
  waitExit,
  waitFor,
} from '../helpers/clients.js';
import { type Daemon, needTool, startPrimary, tempDir } from '../helpers/daemon.js';

const M = 1024 * 1024;

/** A TCP listener on 127.0.0.1 with an OS-chosen port, to make that port "in use". */
async function occupyPort(): Promise<{ port: number; close: () => Promise<void> }> {
  const server = net.createServer((s) => s.destroy());
  await new Promise<void>((resolve) =>
    server.listen({ host: '127.0.0.1', port: 0, exclusive: true }, resolve),
  );
  return {
    port: (server.address() as net.AddressInfo).port,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

describe('volrep primary refusals', { timeout: 90_000 }, () => {
  let tmp: ReturnType<typeof tempDir>;
  const daemons: Daemon[] = [];
  before(() => {
    tmp = tempDir();
  });
  after(async () => {
    for (const d of daemons) await d.kill();
    tmp?.cleanup();
  });

  it('a volume that was never created: exit 2, one line', async () => {
    const r = await volrepAsync([
      'primary',
      '--volume',
      path.join(tmp.dir, 'nope.img'),
      '--nbd',
      '127.0.0.1:0',
    ]);
    assertUsageError(r, /not found.*volrep create/);
  });

  it('metadata present but the volume file missing: exit 2, one line', async () => {
    const volume = createVolumeCli(tmp.dir, 'gone.img', '1M');
    rmSync(volume);
    const r = await volrepAsync(['primary', '--volume', volume, '--nbd', '127.0.0.1:0']);
    assertUsageError(r, /not found/);
    assert.equal(existsSync(`${volume}.volrep/lock`), false, 'no lock may be left behind');
  });

  it('a volume whose size differs from its metadata: exit 2, one line', async () => {
    const volume = createVolumeCli(tmp.dir, 'resized.img', '1M');
    truncateSync(volume, 2 * M);
    const r = await volrepAsync(['primary', '--volume', volume, '--nbd', '127.0.0.1:0']);
    assertUsageError(r, /2097152.*1048576/);
  });

  it('corrupt or newer meta.json: exit 2, one line saying which', async () => {
    const volume = createVolumeCli(tmp.dir, 'meta.img', '1M');
    const metaFile = `${volume}.volrep/meta.json`;
    const good = readFileSync(metaFile, 'utf8');
    writeFileSync(metaFile, '{ not json');
    assertUsageError(await volrepAsync(['primary', '--volume', volume, '--nbd', '127.0.0.1:0']), /corrupt/);
    writeFileSync(metaFile, JSON.stringify({ ...JSON.parse(good), formatVersion: 99 }));
    assertUsageError(await volrepAsync(['primary', '--volume', volume, '--nbd', '127.0.0.1:0']), /newer/);
  });

  it('a malformed --nbd or --http address: exit 2, one line', async () => {
    const volume = createVolumeCli(tmp.dir, 'addr.img', '1M');
    assertUsageError(
      await volrepAsync(['primary', '--volume', volume, '--nbd', '127.0.0.1:notaport']),
      /--nbd/,
    );
    assertUsageError(
      await volrepAsync(['primary', '--volume', volume, '--nbd', '127.0.0.1:0', '--http', 'x:99999']),
      /--http/,
    );
  });

  it('a second primary on the same volume: exit 2 naming the lock holder; the first keeps serving', async () => {
    const volume = createVolumeCli(tmp.dir, 'locked.img', '4M');
    const first = await startPrimary(volume);
    daemons.push(first);
    const lockFile = `${volume}.volrep/lock`;
    assert.equal(readFileSync(lockFile, 'utf8').trim(), String(first.child.pid), 'lock holds the pid');

    const second = await volrepAsync(['primary', '--volume', volume, '--nbd', '127.0.0.1:0']);
    assertUsageError(second, /in use|lock/i);
    assert.match(second.stderr, new RegExp(`pid ${first.child.pid}\\b`));
    assert.equal(
      readFileSync(lockFile, 'utf8').trim(),
      String(first.child.pid),
      'the lock is still the first',
    );

    const client = await NbdClient.connect(first.nbd.host, first.nbd.port, 'volrep');
    try {
      assert.equal(client.size, 4 * M);
      await client.write(0, Buffer.alloc(4096, 9));
      assert.deepEqual([...(await client.read(0, 4))], [9, 9, 9, 9]);
    } finally {
      await client.close();
    }
    assert.equal(await first.stop(), 0);
    assert.equal(existsSync(lockFile), false, 'a graceful stop releases the lock');
  });

  it('a lock held by another live process is respected', async () => {
    const volume = createVolumeCli(tmp.dir, 'foreign.img', '1M');
    // This test process is alive: its pid in the lock file must keep volrep out.
    writeFileSync(`${volume}.volrep/lock`, `${process.pid}\n`);
    const r = await volrepAsync(['primary', '--volume', volume, '--nbd', '127.0.0.1:0']);
    assertUsageError(r, new RegExp(`pid ${process.pid}\\b`));
    assert.equal(readFileSync(`${volume}.volrep/lock`, 'utf8').trim(), String(process.pid));
  });

  it('NBD port in use: exit 2, one line, and the volume is not left locked', async () => {
    const volume = createVolumeCli(tmp.dir, 'port.img', '1M');
    const busy = await occupyPort();
    try {
      const r = await volrepAsync(['primary', '--volume', volume, '--nbd', `127.0.0.1:${busy.port}`]);
      assertUsageError(r, new RegExp(`127\\.0\\.0\\.1:${busy.port}.*in use`));
    } finally {
      await busy.close();
    }
    assert.equal(existsSync(`${volume}.volrep/lock`), false, 'the lock must be released');
    const d = await startPrimary(volume);
    daemons.push(d);
    await nbdRoundTrip(d);
    assert.equal(await d.stop(), 0);
  });

  it('HTTP port in use: exit 2, one line, and the volume is not left locked', async () => {
    const volume = createVolumeCli(tmp.dir, 'httpport.img', '1M');
    const busy = await occupyPort();
    try {
      const r = await volrepAsync([
        'primary',
        '--volume',
        volume,
        '--nbd',
        '127.0.0.1:0',
        '--http',
        `127.0.0.1:${busy.port}`,
      ]);
      assertUsageError(r, /HTTP.*in use/);
    } finally {
      await busy.close();
    }
    assert.equal(existsSync(`${volume}.volrep/lock`), false, 'the lock must be released');
  });

  it('a primary killed with SIGKILL leaves a stale lock that the next start takes over', async () => {
    const volume = createVolumeCli(tmp.dir, 'stale.img', '4M');
    const lockFile = `${volume}.volrep/lock`;
    const first = await startPrimary(volume);
    daemons.push(first);
    const client = await NbdClient.connect(first.nbd.host, first.nbd.port, 'volrep');
    await client.write(M, Buffer.alloc(8192, 0x5c), true);
    await first.kill();
    assert.equal(first.child.signalCode, 'SIGKILL');
    assert.equal(readFileSync(lockFile, 'utf8').trim(), String(first.child.pid), 'the stale lock is left');

    const second = await startPrimary(volume);
    daemons.push(second);
    assert.equal(readFileSync(lockFile, 'utf8').trim(), String(second.child.pid), 'the lock is taken over');
    const c2 = await NbdClient.connect(second.nbd.host, second.nbd.port, 'volrep');
    try {
      const back = await c2.read(M, 8192);
      assert.ok(back.equals(Buffer.alloc(8192, 0x5c)), 'a FUA write before SIGKILL survives');
    } finally {
      await c2.close();
    }
    assert.equal(await second.stop(), 0);
    assert.equal(existsSync(lockFile), false);
  });
});

const skipQemu = needTool('qemu-io', 'qemu-utils');

describe('volrep primary --http', { timeout: 60_000 }, () => {
  let tmp: ReturnType<typeof tempDir>;
  let volume: string;
  let daemon: Daemon | undefined;
  const metrics = async () => {
    const r = await httpRequest(daemon!.http!, '/metrics');
    assert.equal(r.status, 200);
    return r.body;
  };
  const status = async () => {
    const r = await httpRequest(daemon!.http!, '/status');
    assert.equal(r.status, 200);
    assert.match(r.contentType, /^application\/json/);
    return JSON.parse(r.body) as {
      role: string;
      volume: { path: string; id: string; size: number; regionSize: number };
      nbd: { address: string; export: string; connections: number };
    };
  };

  before(async () => {
    tmp = tempDir();
    volume = createVolumeCli(tmp.dir, 'http.img', '16M', ['--region-size', '128K']);
    daemon = await startPrimary(volume, { http: true });
  });
  after(async () => {
    await daemon?.kill();
    tmp?.cleanup();
  });

  it('GET /status describes the primary, and connections follows open clients', async () => {
    const meta = JSON.parse(readFileSync(`${volume}.volrep/meta.json`, 'utf8')) as { volumeId: string };
    const s = await status();
    assert.equal(s.role, 'primary');
    assert.equal(s.volume.path, path.resolve(volume));
    assert.equal(s.volume.id, meta.volumeId);
    assert.equal(s.volume.size, 16 * M);
    assert.equal(s.volume.regionSize, 128 * 1024);
    assert.equal(s.nbd.address, `${daemon!.nbd.host}:${daemon!.nbd.port}`);
    assert.equal(s.nbd.export, 'volrep');
    assert.equal(s.nbd.connections, 0);

    const a = await NbdClient.connect(daemon!.nbd.host, daemon!.nbd.port, 'volrep');
    try {
      await waitFor(async () => (await status()).nbd.connections === 1, 'connections = 1');
      const b = await NbdClient.connect(daemon!.nbd.host, daemon!.nbd.port, 'volrep');
      await waitFor(async () => (await status()).nbd.connections === 2, 'connections = 2');
      await b.close();
      await waitFor(async () => (await status()).nbd.connections === 1, 'connections back to 1');
    } finally {
      await a.close();
    }
    await waitFor(async () => (await status()).nbd.connections === 0, 'connections back to 0');
  });

  it('GET /metrics is Prometheus text counting exactly the requests issued', async () => {
    const first = await httpRequest(daemon!.http!, '/metrics');
    assert.match(first.contentType, /^text\/plain/);
    assert.match(first.body, /^# TYPE volrep_nbd_requests_total counter$/m);
    assert.match(first.body, /^# TYPE volrep_nbd_bytes_total counter$/m);
    assert.match(first.body, /^volrep_process_/m);

    const before = first.body;
    const client = await NbdClient.connect(daemon!.nbd.host, daemon!.nbd.port, 'volrep');
    await client.write(0, Buffer.alloc(4096, 1));
    await client.write(4096, Buffer.alloc(8192, 2));
    await client.write(M, Buffer.alloc(100_000, 3));
    await client.write(2 * M, Buffer.alloc(512, 4), true);
    await client.read(0, 4096);
    await client.read(M, 65536);
    await client.writeZeroes(3 * M, 8192);
    await client.trim(4 * M, 4096);
    await client.flush();
    await assert.rejects(client.write(16 * M - 512, Buffer.alloc(1024)), /NBD error 28/); // ENOSPC
    await assert.rejects(client.read(16 * M, 4096), /NBD error 22/); // EINVAL
    await client.close();
    const now = await metrics();

    const delta = (name: string, labels: Record<string, string>) => {
      const a = metricValue(now, name, labels);
      assert.ok(a !== undefined, `no sample ${name}${JSON.stringify(labels)}`);
      return a - (metricValue(before, name, labels) ?? 0);
    };
    const req = (command: string, result: string) => delta('volrep_nbd_requests_total', { command, result });
    const bytes = (command: string) => delta('volrep_nbd_bytes_total', { command });
    assert.equal(req('write', 'ok'), 4);
    assert.equal(bytes('write'), 4096 + 8192 + 100_000 + 512);
    assert.equal(req('write', 'error'), 1);
    assert.equal(req('read', 'ok'), 2);
    assert.equal(bytes('read'), 4096 + 65536);
    assert.equal(req('read', 'error'), 1);
    assert.equal(req('write_zeroes', 'ok'), 1);
    assert.equal(bytes('write_zeroes'), 8192);
    assert.equal(req('trim', 'ok'), 1);
    assert.equal(bytes('trim'), 4096);
    assert.equal(req('flush', 'ok'), 1);
    await waitFor(async () => {
      const m = await metrics();
      return (
        (metricValue(m, 'volrep_nbd_requests_total', { command: 'disc', result: 'ok' }) ?? 0) -
          (metricValue(before, 'volrep_nbd_requests_total', { command: 'disc', result: 'ok' }) ?? 0) ===
        1
      );
    }, 'one disc counted');
  });

  it('counts the writes a qemu-io run issues', { skip: skipQemu }, async () => {
    const before = await metrics();
    const r = await qemuIo(daemon!.nbd.uri, [
      `write -P 0x61 ${5 * M} 65536`,
      `write -P 0x62 ${6 * M} 4096`,
      `write -z ${7 * M} 131072`,
      `read -P 0x61 ${5 * M} 65536`,
    ]);
    assert.equal(r.code, 0, describeRun('qemu-io', r));
    const now = await metrics();
    const d = (name: string, labels: Record<string, string>) =>
      (metricValue(now, name, labels) ?? Number.NaN) - (metricValue(before, name, labels) ?? 0);
    assert.equal(d('volrep_nbd_requests_total', { command: 'write', result: 'ok' }), 2);
    assert.equal(d('volrep_nbd_bytes_total', { command: 'write' }), 65536 + 4096);
    assert.equal(d('volrep_nbd_requests_total', { command: 'write_zeroes', result: 'ok' }), 1);
    assert.equal(d('volrep_nbd_bytes_total', { command: 'write_zeroes' }), 131072);
    assert.ok(d('volrep_nbd_requests_total', { command: 'read', result: 'ok' }) >= 1);
    assert.ok(d('volrep_nbd_bytes_total', { command: 'read' }) >= 65536);
  });

  it('other paths are 404, other methods 405', async () => {
    assert.equal((await httpRequest(daemon!.http!, '/nope')).status, 404);
    assert.equal((await httpRequest(daemon!.http!, '/status', 'POST')).status, 405);
  });

  it('SIGTERM with no client stops with exit 0 and releases the lock', async () => {
    const code = await daemon!.stop();
    assert.equal(code, 0, daemon!.stderr());
    await waitExit(daemon!.child, 1000);
    assert.match(daemon!.stderr(), /"primary stopped"/);
    assert.equal(existsSync(`${volume}.volrep/lock`), false);
  });
});
