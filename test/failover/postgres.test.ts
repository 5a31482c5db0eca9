/**
 * A transaction-logging application on top: PostgreSQL on ext4 on the primary's export (as root,
 * nbdfuse + loop), volrep in sync mode, pgbench running plus a ledger table the test inserts into
 * one row at a time, recording each id whose COMMIT returned. SIGKILL the primary; promote the
 * replica; mount it and start PostgreSQL there: it recovers, and every recorded id is in the
 * ledger. Then fail back: write there, bring the old primary back as a secondary, and check that
 * only the changed regions are sent and the volumes end byte-identical.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { chmodSync, chownSync, existsSync, mkdirSync, readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { describeRun, run, waitFor } from '../helpers/clients.js';
import { MountedExport, needFilesystemTools } from '../helpers/filesystem.js';
import { REGION, Sites } from './sites.js';

function postgresBin(): string | undefined {
  const root = '/usr/lib/postgresql';
  if (!existsSync(root)) return undefined;
  const versions = readdirSync(root).sort((x, y) => Number(y) - Number(x));
  for (const v of versions)
    if (existsSync(path.join(root, v, 'bin/postgres'))) return path.join(root, v, 'bin');
  return undefined;
}

const bin = postgresBin();
const skip =
  needFilesystemTools() ??
  (bin === undefined
    ? process.env.CI
      ? (() => {
          throw new Error('PostgreSQL is missing in CI: .ci/run must install postgresql');
        })()
      : 'PostgreSQL not installed (apt-get install postgresql)'
    : undefined);

const PORT = 54000 + Math.floor(Math.random() * 1000);

/** Runs a PostgreSQL tool as the postgres user. */
function pg(tool: string, args: string[], timeout = 120_000) {
  return run('runuser', ['-u', 'postgres', '--', path.join(bin!, tool), ...args], { timeout });
}

function psqlArgs(socketDir: string, sql: string): string[] {
  return ['-h', socketDir, '-p', String(PORT), '-d', 'postgres', '-At', '-v', 'ON_ERROR_STOP=1', '-c', sql];
}

/** Starts PostgreSQL on `dataDir`; resolves once it accepts connections (crash recovery done). */
async function startPostgres(dataDir: string, socketDir: string): Promise<void> {
  const r = await pg('pg_ctl', [
    'start',
    '-w',
    '-t',
    '120',
    '-D',
    dataDir,
    '-l',
    path.join(socketDir, 'server.log'),
    '-o',
    `-p ${PORT} -k ${socketDir} -c listen_addresses='' -c fsync=on -c synchronous_commit=on -c full_page_writes=on`,
  ]);
  assert.equal(
    r.code,
    0,
    `${describeRun('pg_ctl start', r)}\n${readFileSync(path.join(socketDir, 'server.log'), 'utf8')}`,
  );
}

/** The postmaster's pid (first line of postmaster.pid) and SIGKILL of it and its children. */
async function killPostgres(pid: number): Promise<void> {
  await run('pkill', ['-9', '-P', String(pid)]);
  try {
    process.kill(pid, 'SIGKILL');
  } catch {}
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

describe('PostgreSQL on the primary: failover in sync mode, then failback', {
  skip,
  timeout: 600_000,
}, () => {
  let sites: Sites;
  const children: ChildProcess[] = [];
  let postmaster = 0;
  const mounted: MountedExport[] = [];
  after(async () => {
    for (const c of children) c.kill('SIGKILL');
    if (postmaster) await killPostgres(postmaster);
    for (const m of mounted) await m.detach(false);
    await sites?.cleanup();
  });

  it('every committed ledger id is on the promoted replica; failback sends only the changed regions', async () => {
    sites = await Sites.create('256M');
    const { a, b } = sites;
    await sites.startSecondary(b);
    // The activity window bounds what the old primary's recovery names after the kill (its log's
    // coverage): 8 MiB here, against the default 1 GiB that would cover this whole volume.
    await sites.startPrimary(a, ['--mode', 'sync', '--activity-window', '8M']);
    await sites.waitInSync(a, 'the initial sync');
    chmodSync(sites.dir, 0o755); // the postgres user reaches its data directory through it
    const socketDir = path.join(sites.dir, 'pgsock');
    mkdirSync(socketDir);
    const fsA = await MountedExport.attach(a.primary!.nbd, path.join(sites.dir, 'fs-a'), { mkfs: true });
    mounted.push(fsA);
    const dataDir = path.join(fsA.mountpoint, 'pgdata');
    const pgUser = await run('id', ['-u', 'postgres']);
    const pgGroup = await run('id', ['-g', 'postgres']);
    const uid = Number(pgUser.stdout.trim());
    const gid = Number(pgGroup.stdout.trim());
    chownSync(socketDir, uid, gid);
    mkdirSync(dataDir);
    chownSync(dataDir, uid, gid);
    chmodSync(dataDir, 0o700);
    const init = await pg('initdb', ['-D', dataDir, '-A', 'trust', '--no-instructions']);
    assert.equal(init.code, 0, describeRun('initdb', init));
    await startPostgres(dataDir, socketDir);
    postmaster = Number(readFileSync(path.join(dataDir, 'postmaster.pid'), 'utf8').split('\n')[0]);
    const setup = await pg('psql', psqlArgs(socketDir, 'CREATE TABLE ledger (id integer PRIMARY KEY)'));
    assert.equal(setup.code, 0, describeRun('create the ledger', setup));
    const bench = await pg('pgbench', ['-h', socketDir, '-p', String(PORT), '-i', '-s', '2', 'postgres']);
    assert.equal(bench.code, 0, describeRun('pgbench -i', bench));

    // pgbench in the background, and the ledger: one INSERT at a time, each id recorded once its
    // commit returned (psql prints "INSERT 0 1" after each autocommitted statement).
    const load = spawn(
      'runuser',
      [
        '-u',
        'postgres',
        '--',
        path.join(bin!, 'pgbench'),
        '-h',
        socketDir,
        '-p',
        String(PORT),
        '-c',
        '2',
        '-T',
        '60',
        'postgres',
      ],
      { stdio: 'ignore' },
    );
    children.push(load);
    const ledger = spawn(
      'runuser',
      [
        '-u',
        'postgres',
        '--',
        path.join(bin!, 'psql'),
        '-h',
        socketDir,
        '-p',
        String(PORT),
        '-d',
        'postgres',
        '-v',
        'ON_ERROR_STOP=1',
      ],
      { stdio: ['pipe', 'pipe', 'ignore'] },
    );
    children.push(ledger);
    const committed: number[] = [];
    let next = 1;
    let buffered = '';
    ledger.stdout!.setEncoding('utf8');
    ledger.stdout!.on('data', (chunk: string) => {
      buffered += chunk;
      const lines = buffered.split('\n');
      buffered = lines.pop()!;
      for (const line of lines) {
        if (line !== 'INSERT 0 1') continue;
        committed.push(next);
        next++;
        ledger.stdin!.write(`INSERT INTO ledger VALUES (${next});\n`);
      }
    });
    ledger.stdin!.on('error', () => {});
    ledger.stdin!.write(`INSERT INTO ledger VALUES (${next});\n`);
    await waitFor(() => committed.length >= 150, '150 ledger commits', 120_000, 20);
    await sites.kill(a); // the primary's site is lost mid-workload
    const recorded = [...committed];
    await killPostgres(postmaster);
    for (const c of children) c.kill('SIGKILL');
    await fsA.detach(false);
    // A process blocked in I/O on the dead export dies once that I/O fails (after the detach).
    const old = postmaster;
    await waitFor(() => !alive(old), 'the old postmaster to be gone', 60_000, 50);
    postmaster = 0;

    // Failover: promote the replica, mount it, let PostgreSQL recover.
    await sites.stop(b);
    const p = sites.promote(b);
    assert.equal(p.status, 0, p.stderr);
    await sites.startPrimary(b);
    const fsB = await MountedExport.attach(b.primary!.nbd, path.join(sites.dir, 'fs-b'), { mkfs: false });
    mounted.push(fsB);
    const dataB = path.join(fsB.mountpoint, 'pgdata');
    await startPostgres(dataB, socketDir);
    postmaster = Number(readFileSync(path.join(dataB, 'postmaster.pid'), 'utf8').split('\n')[0]);
    const rows = await pg('psql', psqlArgs(socketDir, 'SELECT id FROM ledger ORDER BY id'));
    assert.equal(rows.code, 0, describeRun('read the ledger', rows));
    const present = new Set(rows.stdout.split('\n').filter(Boolean).map(Number));
    const missing = recorded.filter((id) => !present.has(id));
    assert.deepEqual(
      missing,
      [],
      `committed ledger ids missing on the promoted replica (of ${recorded.length})`,
    );
    const accounts = await pg('psql', psqlArgs(socketDir, 'SELECT count(*) FROM pgbench_accounts'));
    assert.equal(accounts.stdout.trim(), '200000', describeRun('pgbench_accounts', accounts));

    // Failback: the new primary writes, stops cleanly; the old one returns as its secondary.
    const more = await pg(
      'psql',
      psqlArgs(socketDir, 'INSERT INTO ledger SELECT g FROM generate_series(1000000, 1000999) g'),
    );
    assert.equal(more.code, 0, describeRun('insert on the new primary', more));
    const stopped = await pg('pg_ctl', ['stop', '-w', '-D', dataB, '-m', 'fast']);
    assert.equal(stopped.code, 0, describeRun('pg_ctl stop', stopped));
    postmaster = 0;
    await fsB.detach(true);
    const newSide = await sites.dirtyRegions(b);
    await sites.stop(b);
    const d = sites.demote(a);
    assert.equal(d.status, 0, d.stderr);
    await sites.startSecondary(a);
    const oldSide = await sites.dirtyRegions(a);
    const differing = sites.differing();
    const union = new Set([...newSide, ...oldSide]);
    for (const r of differing) assert.ok(union.has(r), `region ${r} differs and is in neither set`);
    await sites.startPrimary(b);
    await sites.waitInSync(b, 'the failback resync', 60_000);
    const sent = await sites.metric(b, 'volrep_resync_bytes_total');
    assert.equal(sent, union.size * REGION, 'only the union is sent');
    assert.ok(
      union.size < sites.size / REGION / 2,
      `the failback sends ${union.size} regions, not the volume`,
    );
    await sites.assertIdentical('after the failback');
    console.log(
      `postgres: ${recorded.length} committed ledger ids, all on the promoted replica; failback: union ${union.size} regions ` +
        `(new primary ${newSide.size}, old primary's recovery ${oldSide.size}), really differing ${differing.length}, ` +
        `resync ${sent} bytes of a ${sites.size}-byte volume`,
    );
  });
});
