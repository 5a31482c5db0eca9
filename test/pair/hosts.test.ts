/**
 * The pair on two network stacks: the primary in one network namespace, the secondary in another,
 * joined by a veth pair on a private /30 and nothing else (no default route, no other interface).
 * Replication crosses the veth over mutual TLS with pinned fingerprints; qemu-io writes to the
 * primary's NBD on its namespace's loopback; status comes from `volrep status` run in the
 * namespaces. Needs root: without it (or when `ip netns add` fails) the test FAILS, it never skips.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { readFileSync, realpathSync } from 'node:fs';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import {
  createVolumeCli,
  describeRun,
  expectFile,
  type RunResult,
  run,
  waitExit,
  waitFor,
} from '../helpers/clients.js';
import { identityOf, needTool, tempDir, VOLREP_BIN } from '../helpers/daemon.js';

const K = 1024;
const M = 1024 * 1024;
const SIZE = 16 * M;

const pid = process.pid;
const NS_A = `volrep-${pid}-a`;
const NS_B = `volrep-${pid}-b`;
/** Interface names: at most 15 characters (a pid has at most 7 digits). */
const VETH_A = `vr${pid}a`;
const VETH_B = `vr${pid}b`;
const SUBNET = `10.213.${(pid % 254) + 1}`;
const ADDR_A = `${SUBNET}.1`;
const ADDR_B = `${SUBNET}.2`;
const LISTEN = `${ADDR_B}:10810`;
const PRIMARY_HTTP = '127.0.0.1:9090';
const SECONDARY_HTTP = '127.0.0.1:9091';
const NBD_URI = 'nbd://127.0.0.1:10809/volrep';

/** Runs a command; fails with its output unless it exits 0. */
async function must(cmd: string, args: string[], timeout = 60_000): Promise<RunResult> {
  const r = await run(cmd, args, { timeout });
  assert.equal(r.code, 0, describeRun(`${cmd} ${args.join(' ')}`, r));
  return r;
}

/** `ip netns exec NS CMD ARGS`. */
function inNs(ns: string, cmd: string, args: string[], timeout = 60_000): Promise<RunResult> {
  return run('ip', ['netns', 'exec', ns, cmd, ...args], { timeout });
}

// biome-ignore lint/suspicious/noExplicitAny: status documents are checked field by field
type Json = any;

/** `volrep status --http ADDR --json`, run inside `ns` (the daemons are reachable only there). */
async function statusIn(ns: string, http: string): Promise<Json> {
  const r = await inNs(ns, process.execPath, [VOLREP_BIN, 'status', '--http', http, '--json'], 30_000);
  assert.equal(r.code, 0, describeRun(`volrep status --http ${http} in ${ns}`, r));
  return JSON.parse(r.stdout);
}

interface NsDaemon {
  child: ChildProcess;
  stderr(): string;
  running(): boolean;
}

/**
 * Starts `volrep ROLE ARGS` inside `ns` (ip netns exec execs it: the child's pid is node's) and
 * waits for its `"<role> serving"` line.
 */
async function startInNs(ns: string, role: 'primary' | 'secondary', args: string[]): Promise<NsDaemon> {
  const child = spawn('ip', ['netns', 'exec', ns, process.execPath, VOLREP_BIN, role, ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let err = '';
  child.stdout!.resume();
  child.stderr!.setEncoding('utf8');
  child.stderr!.on('data', (chunk: string) => {
    err += chunk;
  });
  const daemon = {
    child,
    stderr: () => err,
    running: () => child.exitCode === null && child.signalCode === null,
  };
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`${role} in ${ns} did not start within 60 s:\n${err}`));
    }, 60_000);
    const onData = () => {
      if (!err.includes(`"${role} serving"`)) return;
      clearTimeout(timer);
      child.stderr!.off('data', onData);
      child.off('exit', onExit);
      resolve();
    };
    const onExit = (code: number | null, signal: string | null) => {
      clearTimeout(timer);
      reject(new Error(`${role} in ${ns} exited (${code ?? signal}) before it was ready:\n${err}`));
    };
    child.stderr!.on('data', onData);
    child.once('exit', onExit);
  });
  return daemon;
}

/** qemu-io run inside namespace A against the primary's NBD on that namespace's loopback. */
async function qemuIoInA(commands: string[], extra: string[] = []): Promise<void> {
  const args = ['-f', 'raw', ...extra];
  for (const c of commands) args.push('-c', c);
  args.push(NBD_URI);
  const r = await inNs(NS_A, 'qemu-io', args, 120_000);
  const what = `qemu-io in ${NS_A}: ${commands.join('; ')}`;
  assert.equal(r.code, 0, describeRun(what, r));
  assert.doesNotMatch(r.stdout + r.stderr, /Pattern verification failed|error|failed/i, describeRun(what, r));
}

/** Bytes sent through an interface of a namespace (`ip -s -j link`). */
async function txBytes(ns: string, dev: string): Promise<number> {
  const r = await must('ip', ['-n', ns, '-s', '-j', 'link', 'show', 'dev', dev]);
  return (JSON.parse(r.stdout) as Json)[0].stats64.tx.bytes as number;
}

const skip = needTool('qemu-io', 'qemu-utils');

describe('the pair on two network namespaces (primary and secondary on separate network stacks)', {
  skip,
  timeout: 600_000,
}, () => {
  const tmp = tempDir('volrep-hosts-');
  const created: string[] = [];
  let ready = false;
  let primary: NsDaemon | undefined;
  let secondary: NsDaemon | undefined;

  after(async () => {
    for (const d of [primary, secondary]) {
      if (d?.running()) {
        d.child.kill('SIGKILL');
        await waitExit(d.child, 30_000).catch(() => undefined);
      }
    }
    const problems: string[] = [];
    for (const ns of created) {
      const r = await run('ip', ['netns', 'del', ns]);
      if (r.code !== 0) problems.push(describeRun(`ip netns del ${ns}`, r));
    }
    tmp.cleanup();
    const left = (await run('ip', ['netns', 'list'])).stdout;
    for (const ns of created) if (left.includes(ns)) problems.push(`network namespace ${ns} is still there`);
    assert.deepEqual(problems, [], 'teardown');
  });

  it('two namespaces joined by a veth pair, with no route anywhere else', async () => {
    const why = 'this test needs root to create network namespaces (it fails rather than skips)';
    assert.equal(process.getuid?.(), 0, `${why}: running as uid ${process.getuid?.()}`);
    for (const ns of [NS_A, NS_B]) {
      const r = await run('ip', ['netns', 'add', ns]);
      assert.equal(r.code, 0, `${why}: ${describeRun(`ip netns add ${ns}`, r)}`);
      created.push(ns);
    }
    // Created directly inside the namespaces: the interfaces never exist on the host's stack.
    await must('ip', [
      'link',
      'add',
      VETH_A,
      'netns',
      NS_A,
      'type',
      'veth',
      'peer',
      'name',
      VETH_B,
      'netns',
      NS_B,
    ]);
    await must('ip', ['-n', NS_A, 'addr', 'add', `${ADDR_A}/30`, 'dev', VETH_A]);
    await must('ip', ['-n', NS_B, 'addr', 'add', `${ADDR_B}/30`, 'dev', VETH_B]);
    for (const [ns, dev] of [
      [NS_A, VETH_A],
      [NS_B, VETH_B],
    ]) {
      await must('ip', ['-n', ns, 'link', 'set', 'lo', 'up']);
      await must('ip', ['-n', ns, 'link', 'set', dev, 'up']);
      // Only lo and the veth; the only IPv4 routes are the /30 and loopback: no traffic can leave.
      const links = JSON.parse((await must('ip', ['-n', ns, '-j', 'link', 'show'])).stdout) as Json[];
      assert.deepEqual(links.map((l) => l.ifname).sort(), ['lo', dev].sort(), `interfaces in ${ns}`);
      const routes = JSON.parse(
        (await must('ip', ['-n', ns, '-j', '-4', 'route', 'show', 'table', 'all'])).stdout,
      );
      for (const r of routes as Json[]) {
        const ok = r.dev === 'lo' || (r.dev === dev && String(r.dst).startsWith(`${SUBNET}.`));
        assert.ok(ok, `unexpected route in ${ns}: ${JSON.stringify(r)}`);
      }
      assert.ok(!(routes as Json[]).some((r) => r.dst === 'default'), `no default route in ${ns}`);
    }
    ready = true;
  });

  it('replicates over the veth with mutual TLS: in sync, pinned fingerprints, byte-identical', async () => {
    assert.ok(ready, 'the namespaces were not set up (see the previous test)');
    const started = Date.now();
    const primaryVolume = createVolumeCli(tmp.dir, 'p.img', '16M');
    const volumeId = (
      JSON.parse(readFileSync(path.join(tmp.dir, 'p.img.volrep/meta.json'), 'utf8')) as { volumeId: string }
    ).volumeId;
    const secondaryVolume = createVolumeCli(tmp.dir, 's.img', '16M', ['--secondary-of', volumeId]);
    const primaryFp = identityOf(primaryVolume);
    const secondaryFp = identityOf(secondaryVolume);

    secondary = await startInNs(NS_B, 'secondary', [
      '--volume',
      secondaryVolume,
      '--listen',
      LISTEN,
      '--allow-peer',
      primaryFp,
      '--http',
      SECONDARY_HTTP,
    ]);
    primary = await startInNs(NS_A, 'primary', [
      '--volume',
      primaryVolume,
      '--peer',
      LISTEN,
      '--peer-fingerprint',
      secondaryFp,
      '--nbd',
      '127.0.0.1:10809',
      '--http',
      PRIMARY_HTTP,
    ]);
    // ip netns exec execs node in place: the signal below reaches the daemon itself.
    for (const d of [primary, secondary]) {
      assert.equal(realpathSync(`/proc/${d.child.pid}/exe`), realpathSync(process.execPath));
    }
    const txBefore = await txBytes(NS_A, VETH_A);

    const writes = [
      `write -P 0x5a 0 ${M}`,
      `write -P 0xa5 ${5 * M + 4 * K} ${512 * K}`,
      `write -P 0x3c ${15 * M - 12345} 100000`,
      `write -z ${256 * K} ${64 * K}`,
    ];
    await qemuIoInA(
      [
        ...writes,
        `read -P 0x5a 0 ${256 * K}`,
        `read -P 0 ${256 * K} ${64 * K}`,
        `read -P 0x5a ${320 * K} ${M - 320 * K}`,
        `read -P 0xa5 ${5 * M + 4 * K} ${512 * K}`,
        `read -P 0x3c ${15 * M - 12345} 100000`,
      ],
      ['-t', 'writethrough'],
    );
    await qemuIoInA(
      [
        `write -P 0xc3 ${8 * M} ${2 * M}`,
        'flush',
        `write -P 0x7e ${SIZE - 3} 3`,
        `read -P 0xc3 ${8 * M} ${2 * M}`,
      ],
      ['-t', 'writeback'],
    );
    const written = M + 512 * K + 100000 + 2 * M + 3;

    let last: Json;
    try {
      await waitFor(
        async () => {
          last = await statusIn(NS_A, PRIMARY_HTTP);
          return (
            last.peer?.state === 'connected' &&
            last.dirtyRegions === 0 &&
            last.pendingUpdates === 0 &&
            last.replica?.consistent === true
          );
        },
        'the pair in sync (primary status in its namespace)',
        180_000,
        250,
      );
    } catch (err) {
      const tail = (s: string) => s.split('\n').slice(-20).join('\n');
      throw new Error(
        `${(err as Error).message}\nlast primary status: ${JSON.stringify(last)}\n` +
          `primary log:\n${tail(primary.stderr())}\nsecondary log:\n${tail(secondary.stderr())}`,
      );
    }
    assert.equal(last.peer.address, LISTEN);
    assert.equal(last.peer.tls, true, 'the replication link must be TLS');
    assert.equal(last.peer.fingerprint, secondaryFp, "peer.fingerprint must be the secondary's");
    assert.equal(last.peer.self, primaryFp);

    const s = await statusIn(NS_B, SECONDARY_HTTP);
    assert.equal(s.tls, true);
    assert.equal(s.fingerprint, secondaryFp);
    assert.equal(s.peer.state, 'connected');
    assert.equal(s.peer.tls, true);
    assert.equal(s.peer.fingerprint, primaryFp, "the secondary's peer must be the primary");
    // The primary's connection comes from namespace A's end of the veth.
    assert.ok(String(s.peer.address).startsWith(`${ADDR_A}:`), `secondary peer address ${s.peer.address}`);
    const sent = (await txBytes(NS_A, VETH_A)) - txBefore;
    assert.ok(sent >= written, `only ${sent} bytes left namespace A by the veth, ${written} were written`);

    for (const [d, what] of [
      [primary, 'primary'],
      [secondary, 'secondary'],
    ] as const) {
      d.child.kill('SIGTERM');
      const exit = await waitExit(d.child, 60_000);
      assert.deepEqual(exit, { code: 0, signal: null }, `${what} exit after SIGTERM\n${d.stderr()}`);
    }

    const a = readFileSync(primaryVolume);
    const b = readFileSync(secondaryVolume);
    assert.equal(a.length, SIZE);
    assert.equal(b.length, SIZE);
    if (!a.equals(b)) {
      let at = 0;
      while (a[at] === b[at]) at++;
      assert.fail(`the replica differs from the volume, first at byte ${at}`);
    }
    expectFile(secondaryVolume, 0, 256 * K, 0x5a);
    expectFile(secondaryVolume, 256 * K, 64 * K, 0);
    expectFile(secondaryVolume, 5 * M + 4 * K, 512 * K, 0xa5);
    expectFile(secondaryVolume, 8 * M, 2 * M, 0xc3);
    expectFile(secondaryVolume, 15 * M - 12345, 100000, 0x3c);
    expectFile(secondaryVolume, SIZE - 3, 3, 0x7e);
    console.log(
      `hosts.test.ts: replicated across namespaces in ${Date.now() - started} ms, ${sent} bytes on the veth`,
    );
  });
});
