// Helpers for bench/nbd.sh (plain Node, no dependencies but volrep's own build for `scatter`).
//
//   node bench/fio.mjs port                      a free TCP port on 127.0.0.1
//   node bench/fio.mjs parse FIO.json            "iops bw_bytes lat_us total_ios" of the job (read or write side);
//                                                exits 1 if fio reported an error or did no I/O
//   node bench/fio.mjs metrics HOST:PORT         "writes log_syncs log_records bitmap_persists volume_syncs"
//                                                from volrep's GET /metrics (counters since start);
//                                                exits 1 if unreachable or a counter is missing
//   node bench/fio.mjs counter HOST:PORT NAME    one series of GET /metrics
//   node bench/fio.mjs status HOST:PORT a.b      one field of GET /status
//   node bench/fio.mjs insync HOST:PORT SECONDS  polls the primary's GET /status every 20 ms until the pair
//                                                is in sync (peer connected, no dirty region, no pending
//                                                update); prints "<epoch ms> <ms waited>"; exits 1 on timeout
//   node bench/fio.mjs scatter HOST:PORT EXPORT COUNT REGION_SIZE
//                                                writes COUNT distinct random regions (random bytes, whole
//                                                regions) through NBD with dist/nbd/client.js, then FLUSH
//   node bench/fio.mjs mirror QMP.sock             over QEMU's QMP socket: starts blockdev-mirror of node
//                                                'src' to 'tgt' in copy-mode write-blocking (a write completes
//                                                once both wrote it) and waits until the job is ready
//   node bench/fio.mjs report SAMPLES.tsv OUT.json [RESYNC.kv RSYNC.txt]
//                                                medians per row and target, ratios, log syncs and records
//                                                per write, tables on stdout and the same as JSON in OUT.json;
//                                                with RESYNC.kv (key=value lines from nbd.sh) and rsync's
//                                                --stats output, the resync vs rsync table too
//
// SAMPLES.tsv lines: row target repeat iops bw_bytes lat_us cpu_pct sync_wait_ms writes log_syncs
// log_records bitmap_persists volume_syncs (the last five are deltas over the fio run, '-' for nbdkit;
// sync_wait_ms is '-' but for pairs). Targets: see TARGETS.
import { randomBytes, randomInt } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';

const ROWS = [
  { row: 'randwrite-4k-qd32', label: '4 KiB randwrite QD32', unit: 'IOPS', writes: true },
  { row: 'randwrite-4k-qd1', label: '4 KiB randwrite QD1', unit: 'IOPS', writes: true },
  { row: 'write-1m-qd8', label: '1 MiB seq write QD8', unit: 'MB/s', writes: true },
  { row: 'randread-4k-qd32', label: '4 KiB randread QD32', unit: 'IOPS', writes: false },
];

const TARGETS = [
  { target: 'nbdkit', key: 'a', label: '(a) nbdkit' },
  { target: 'volrep', key: 'b', label: '(b) standalone' },
  { target: 'volrep-async', key: 'c', label: '(c) async pair' },
  { target: 'volrep-sync', key: 'd', label: '(d) sync pair' },
  { target: 'volrep-small', key: 'e', label: '(e) small window' },
  { target: 'volrep-async-plain', key: 'f', label: '(f) async plaintext' },
  { target: 'qemu-mirror', key: 'g', label: '(g) QEMU mirror' },
];

const RATIOS = [
  ['c', 'a'],
  ['c', 'b'],
  ['d', 'b'],
  // TLS (the default) against plaintext, same pair otherwise.
  ['c', 'f'],
  // Against a peer that replicates: QEMU's synchronous (write-blocking) mirror.
  ['d', 'g'],
  ['c', 'g'],
];

// Prometheus series read by `metrics`, in output order.
const SERIES = [
  'volrep_nbd_requests_total{command="write",result="ok"}',
  'volrep_log_syncs_total',
  'volrep_log_records_total',
  'volrep_bitmap_persists_total',
  'volrep_volume_syncs_total',
];
const LOG_FIELDS = ['writes', 'logSyncs', 'logRecords', 'bitmapPersists', 'volumeSyncs'];

function fail(message) {
  process.stderr.write(`fio.mjs: ${message}\n`);
  process.exit(1);
}

function freePort() {
  const server = net.createServer();
  server.listen({ host: '127.0.0.1', port: 0 }, () => {
    const { port } = server.address();
    server.close(() => process.stdout.write(`${port}\n`));
  });
}

function parse(file) {
  const text = fs.readFileSync(file, 'utf8');
  // fio may print notes before the JSON object; start at the first '{' on its own line.
  const start = text.search(/^\{/m);
  if (start < 0) fail(`${file}: no JSON object in fio output`);
  let out;
  try {
    out = JSON.parse(text.slice(start));
  } catch (err) {
    fail(`${file}: cannot parse fio JSON: ${err.message}`);
  }
  const job = out.jobs?.[0];
  if (!job) fail(`${file}: no job in fio output`);
  if (job.error) fail(`${file}: fio job error ${job.error}`);
  const side = job.write.io_bytes > 0 ? job.write : job.read;
  if (!(side.io_bytes > 0) || !(side.iops > 0)) fail(`${file}: fio did no I/O`);
  const latUs = (side.clat_ns?.mean ?? 0) / 1000;
  process.stdout.write(`${side.iops.toFixed(1)} ${side.bw_bytes} ${latUs.toFixed(1)} ${side.total_ios}\n`);
}

async function get(address, path) {
  try {
    const res = await fetch(`http://${address}${path}`, { signal: AbortSignal.timeout(5000) });
    if (!res.ok) fail(`GET http://${address}${path}: HTTP ${res.status}`);
    return await res.text();
  } catch (err) {
    fail(`GET http://${address}${path}: ${err.message}`);
  }
}

async function readMetrics(address) {
  const values = new Map();
  for (const line of (await get(address, '/metrics')).split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const sep = line.lastIndexOf(' ');
    values.set(line.slice(0, sep), Number(line.slice(sep + 1)));
  }
  const value = (name) => {
    const v = values.get(name);
    if (!Number.isFinite(v)) fail(`GET http://${address}/metrics: no ${name}`);
    return v;
  };
  return value;
}

async function metrics(address) {
  const value = await readMetrics(address);
  process.stdout.write(`${SERIES.map(value).join(' ')}\n`);
}

async function counter(address, name) {
  const value = await readMetrics(address);
  process.stdout.write(`${value(name)}\n`);
}

async function status(address, field) {
  let v = JSON.parse(await get(address, '/status'));
  for (const key of field.split('.')) v = v?.[key];
  if (v === undefined) fail(`GET http://${address}/status: no ${field}`);
  process.stdout.write(`${v}\n`);
}

async function insync(address, seconds) {
  const start = Date.now();
  for (;;) {
    const s = JSON.parse(await get(address, '/status'));
    if (s.peer?.state === 'connected' && s.dirtyRegions === 0 && s.pendingUpdates === 0) {
      const now = Date.now();
      process.stdout.write(`${now} ${now - start}\n`);
      return;
    }
    if (Date.now() - start > seconds * 1000) {
      fail(
        `${address}: not in sync after ${seconds} s (peer ${s.peer?.state}, ${s.dirtyRegions} dirty regions, ` +
          `${s.pendingUpdates} pending updates)`,
      );
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** Until the primary's peer is connected and consistent (its resync ended), with writes going on. */
async function consistent(address, seconds) {
  const start = Date.now();
  for (;;) {
    const s = JSON.parse(await get(address, '/status'));
    if (s.peer?.state === 'connected') {
      const now = Date.now();
      process.stdout.write(`${now} ${now - start}\n`);
      return;
    }
    if (Date.now() - start > seconds * 1000)
      fail(
        `${address}: resync not done after ${seconds} s (peer ${s.peer?.state}, ${s.dirtyRegions} dirty regions)`,
      );
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

async function scatter(address, exportName, count, regionSize) {
  const { NbdClient } = await import(new URL('../dist/nbd/client.js', import.meta.url));
  const sep = address.lastIndexOf(':');
  const client = await NbdClient.connect(address.slice(0, sep), Number(address.slice(sep + 1)), exportName);
  const regions = Math.floor(client.size / regionSize);
  if (count > regions) fail(`scatter: ${count} regions asked, the volume has ${regions}`);
  const chosen = new Set();
  while (chosen.size < count) chosen.add(randomInt(regions));
  await Promise.all([...chosen].map((r) => client.write(r * regionSize, randomBytes(regionSize))));
  await client.flush();
  await client.close();
}

function median(values) {
  const v = [...values].sort((a, b) => a - b);
  if (v.length === 0) return Number.NaN;
  const mid = Math.floor(v.length / 2);
  return v.length % 2 ? v[mid] : (v[mid - 1] + v[mid]) / 2;
}

const num = (text) => (text === undefined || text === '-' ? null : Number(text));

function medianOrNull(values) {
  const v = values.filter((x) => x !== null && Number.isFinite(x));
  return v.length === 0 ? null : median(v);
}

/** Log counters summed over the runs, and per write over all of them (null if no write). */
function logFigures(samples) {
  const runs = samples.filter((s) => s.log !== null);
  if (runs.length === 0) return null;
  const total = Object.fromEntries(LOG_FIELDS.map((f) => [f, runs.reduce((sum, s) => sum + s.log[f], 0)]));
  const per = (f) => (total.writes > 0 ? total[f] / total.writes : null);
  return {
    ...total,
    syncsPerWrite: per('logSyncs'),
    recordsPerWrite: per('logRecords'),
    writesPerSync: total.logSyncs > 0 ? total.writes / total.logSyncs : null,
    runs: runs.map((s) => ({ repeat: s.repeat, ...s.log })),
  };
}

function markdown(table) {
  const widths = table[0].map((_, i) => Math.max(...table.map((line) => line[i].length)));
  const line = (cells) =>
    `| ${cells.map((c, i) => (i < 1 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join(' | ')} |`;
  const out = [
    line(table[0]),
    `|${widths.map((w, i) => (i < 1 ? `:${'-'.repeat(w + 1)}` : `${'-'.repeat(w + 1)}:`)).join('|')}|`,
  ];
  for (const cells of table.slice(1)) out.push(line(cells));
  return `${out.join('\n')}\n`;
}

function readResync(kvFile, rsyncFile) {
  const kv = Object.fromEntries(
    fs
      .readFileSync(kvFile, 'utf8')
      .split('\n')
      .filter((l) => l.includes('='))
      .map((l) => {
        const [k, v] = l.split('=');
        return [k, num(v)];
      }),
  );
  const stats = fs.readFileSync(rsyncFile, 'utf8');
  const stat = (label) => {
    const m = stats.match(new RegExp(`^${label}: ([\\d,]+)`, 'm'));
    return m ? Number(m[1].replaceAll(',', '')) : null;
  };
  return {
    ...kv,
    expectedResyncBytes: kv.regions * kv.regionSize,
    rsync: {
      ms: kv.rsyncMs,
      totalBytesSent: stat('Total bytes sent'),
      totalBytesReceived: stat('Total bytes received'),
      literalData: stat('Literal data'),
      matchedData: stat('Matched data'),
    },
  };
}

function report(samplesFile, jsonFile, resyncFile, rsyncFile) {
  const samples = fs
    .readFileSync(samplesFile, 'utf8')
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((l) => {
      const [row, target, repeat, iops, bw, lat, cpu, wait, ...rest] = l.split(/\s+/);
      const counts = rest.slice(0, LOG_FIELDS.length).map(num);
      const [ios, usPrimary, usSecondary] = rest.slice(LOG_FIELDS.length).map(num);
      return {
        row,
        target,
        repeat: +repeat,
        iops: +iops,
        bwBytes: +bw,
        latUs: +lat,
        cpuPct: +cpu,
        // CPU µs per I/O over the measured run: the server (primary) and the secondary apart.
        usPerOpPrimary: ios ? usPrimary / ios : null,
        usPerOpSecondary: ios && usSecondary !== null ? usSecondary / ios : null,
        syncWaitMs: num(wait),
        log:
          counts.length === LOG_FIELDS.length && counts.every((c) => c !== null)
            ? Object.fromEntries(LOG_FIELDS.map((f, i) => [f, counts[i]]))
            : null,
      };
    });
  const smallWindow = process.env.BENCH_SMALL_WINDOW ?? null;
  const smallRegion = process.env.BENCH_SMALL_REGION ?? null;
  const present = TARGETS.filter((t) => samples.some((s) => s.target === t.target));
  const summary = (def, target) => {
    const mine = samples.filter((s) => s.row === def.row && s.target === target);
    if (mine.length === 0) return null;
    const values = mine.map((s) => (def.unit === 'MB/s' ? s.bwBytes / 1e6 : s.iops));
    const waits = mine.map((s) => s.syncWaitMs).filter((w) => w !== null);
    return {
      median: median(values),
      samples: values,
      latUsMedian: median(mine.map((s) => s.latUs)),
      cpuPctMedian: median(mine.map((s) => s.cpuPct)),
      usPerOpPrimary: medianOrNull(mine.map((s) => s.usPerOpPrimary)),
      usPerOpSecondary: medianOrNull(mine.map((s) => s.usPerOpSecondary)),
      syncWaitMsMedian: waits.length ? median(waits) : null,
      log: def.writes && target !== 'nbdkit' && target !== 'qemu-mirror' ? logFigures(mine) : null,
    };
  };
  const rows = ROWS.map((def) => {
    const targets = Object.fromEntries(present.map((t) => [t.key, summary(def, t.target)]));
    const ratios = Object.fromEntries(
      RATIOS.map(([x, y]) => [
        `${x}/${y}`,
        targets[x] && targets[y] ? targets[x].median / targets[y].median : null,
      ]),
    );
    if (targets.e) ratios['e/b'] = targets.b ? targets.e.median / targets.b.median : null;
    return { row: def.row, label: def.label, unit: def.unit, targets, ratios };
  });

  const fmt = (n, unit) =>
    Number.isFinite(n) ? (unit === 'MB/s' ? n.toFixed(0) : Math.round(n).toLocaleString('en-US')) : '-';
  const times = (n) => (n === null || !Number.isFinite(n) ? '-' : `${n.toFixed(2)}×`);
  const perWrite = (n) =>
    n === null || n === undefined ? '-' : n < 0.0005 && n > 0 ? n.toExponential(1) : n.toFixed(3);
  const ratioKeys = Object.keys(rows[0].ratios);
  const slash = (r, f) => present.map((t) => f(r.targets[t.key])).join(' / ');

  let out = markdown([
    ['row', 'unit', ...present.map((t) => t.label), ...ratioKeys],
    ...rows.map((r) => [
      r.label,
      r.unit,
      ...present.map((t) => fmt(r.targets[t.key]?.median, r.unit)),
      ...ratioKeys.map((k) => times(r.ratios[k])),
    ]),
  ]);
  const keys = present.map((t) => t.key).join('/');
  const logKeys = present.filter((t) => t.key !== 'a');
  out += '\n';
  out += markdown([
    [
      'row',
      `clat µs ${keys}`,
      `server CPU % ${keys}`,
      `log syncs/write ${logKeys.map((t) => t.key).join('/')}`,
      `log records/write ${logKeys.map((t) => t.key).join('/')}`,
      'wait for in sync ms c/d',
    ],
    ...rows.map((r) => [
      r.label,
      slash(r, (s) => (s ? s.latUsMedian.toFixed(0) : '-')),
      slash(r, (s) => (s ? s.cpuPctMedian.toFixed(0) : '-')),
      logKeys.map((t) => perWrite(r.targets[t.key]?.log?.syncsPerWrite)).join(' / '),
      logKeys.map((t) => perWrite(r.targets[t.key]?.log?.recordsPerWrite)).join(' / '),
      ['c', 'd'].map((k) => r.targets[k]?.syncWaitMsMedian ?? '-').join(' / '),
    ]),
  ]);
  // CPU per I/O of each daemon: what decides throughput once each side has a machine of its own.
  const us = (n) => (n === null || n === undefined ? '-' : n.toFixed(1));
  out += '\n';
  out += markdown([
    [
      'row',
      ...present.map(
        (t) =>
          `CPU µs/op ${t.label}${t.key === 'a' || t.key === 'b' || t.key === 'e' ? '' : ' primary / secondary'}`,
      ),
    ],
    ...rows.map((r) => [
      r.label,
      ...present.map((t) => {
        const s = r.targets[t.key];
        if (!s) return '-';
        return s.usPerOpSecondary === null
          ? us(s.usPerOpPrimary)
          : `${us(s.usPerOpPrimary)} / ${us(s.usPerOpSecondary)}`;
      }),
    ]),
  ]);
  out +=
    'Server CPU: 100 = one core, primary + secondary for pairs, over the measured run. Log figures: /metrics deltas over each whole\n' +
    'fio run (ramp included), summed over the repeats. Wait for in sync: after each run against a pair, until\n' +
    'the primary reports the peer connected, no dirty region, no pending update (median, not in the figures).\n';
  if (present.some((t) => t.key === 'e')) {
    out += `(e): primary --activity-window ${smallWindow} on a volume of ${smallRegion} regions, no peer.\n`;
  }

  let resync = null;
  if (resyncFile) {
    resync = readResync(resyncFile, rsyncFile);
    const ms = (n) => (n === null ? '-' : `${(n / 1000).toFixed(2)} s`);
    const mib = (n) =>
      n === null ? '-' : `${(n / 1048576).toFixed(2)} MiB (${n.toLocaleString('en-US')} B)`;
    out += `\nresync vs rsync, 1 GiB volume, ${resync.regions} random regions of ${resync.regionSize / 1024} KiB changed:\n`;
    out += markdown([
      ['', 'time', 'bytes'],
      [
        'volrep resync: secondary restart → in sync',
        ms(resync.restartToInSyncMs),
        `resync ${mib(resync.resyncBytes)}, expected ${mib(resync.expectedResyncBytes)}`,
      ],
      ['  of which restart → secondary serving (Node start-up, recovery)', ms(resync.restartToServingMs), ''],
      ['  of which serving → primary reconnected', ms(resync.servingToConnectedMs), ''],
      ['  of which reconnected → in sync', ms(resync.connectedToInSyncMs), ''],
      [
        'volrep resync: secondary serving → in sync (what a user waits for)',
        ms(resync.servingToInSyncMs),
        '',
      ],
      [
        'rsync --inplace --no-whole-file --ignore-times primary.img old-copy.img',
        ms(resync.rsync.ms),
        `sent ${mib(resync.rsync.totalBytesSent)}, literal ${mib(resync.rsync.literalData)}`,
      ],
      ['ratio volrep (restart → in sync) / rsync', times(resync.restartToInSyncMs / resync.rsync.ms), ''],
      [
        'speed-up over rsync, secondary serving → in sync',
        resync.servingToInSyncMs === null ? '-' : times(resync.rsync.ms / resync.servingToInSyncMs),
        '',
      ],
      [
        'speed-up over rsync, reconnected → in sync',
        resync.connectedToInSyncMs === null ? '-' : times(resync.rsync.ms / resync.connectedToInSyncMs),
        '',
      ],
    ]);
    if (resync.loadRegions !== undefined) {
      const s = resync.loadConnectedToConsistentMs;
      out += `\nresync under load: ${resync.loadRegions} regions changed while the secondary was down (${resync.loadDirtyBefore} dirty), resynced while fio wrote 4 KiB randwrite QD32 to the primary:\n`;
      out += markdown([
        ['', 'value'],
        ['reconnected → resync ended (replica consistent)', ms(s)],
        ['resync bytes', mib(resync.loadResyncBytes)],
        [
          'resync rate under load',
          s === null || s === 0 ? '-' : `${(resync.loadResyncBytes / 1e6 / (s / 1000)).toFixed(0)} MB/s`,
        ],
        ['fio IOPS over its whole run (the resync included)', String(resync.loadFioIops ?? '-')],
      ]);
    }
    if (resync.freshSizeBytes !== undefined) {
      out += `\nfresh pair: two ${(resync.freshSizeBytes / 2 ** 30).toLocaleString('en-US')} GiB sparse volumes made by volrep create (no --assume-clean), ${resync.freshWrites} regions written before the secondary started:\n`;
      out += markdown([
        ['', 'value'],
        ['secondary serving → in sync', ms(resync.freshServingToInSyncMs)],
        ['resync bytes (only the regions written)', mib(resync.freshResyncBytes)],
      ]);
    }
    if (resync.fullBytes !== undefined) {
      const rate = (ms) =>
        ms === null || ms === 0 ? '-' : `${(resync.fullBytes / 1e6 / (ms / 1000)).toFixed(0)} MB/s`;
      out += `\nfull sync of ${mib(resync.fullBytes)} of random data (an adopted file) vs nbdcopy --flush of the same file to nbdkit, each to a new file (nbdcopy first):\n`;
      out += markdown([
        ['', 'time', 'rate'],
        [
          'volrep: primary serving → in sync',
          ms(resync.fullServingToInSyncMs),
          rate(resync.fullServingToInSyncMs),
        ],
        ['nbdcopy --flush file → nbdkit (new file)', ms(resync.fullNbdcopyMs), rate(resync.fullNbdcopyMs)],
        [
          'ratio volrep / nbdcopy (rate)',
          resync.fullServingToInSyncMs ? times(resync.fullNbdcopyMs / resync.fullServingToInSyncMs) : '-',
          '',
        ],
        ['resync bytes', mib(resync.fullResyncBytes), ''],
      ]);
    }
    out +=
      `Dirty regions on the primary before the restart: ${resync.dirtyBefore}. Both files in the page cache; ` +
      'rsync is local (no network).\n';
  }
  process.stdout.write(out);

  const meta = {
    date: new Date().toISOString(),
    runtimeSeconds: Number(process.env.BENCH_RUNTIME ?? 4),
    repeats: Number(process.env.BENCH_REPEATS ?? 3),
    node: process.version,
    fio: process.env.BENCH_FIO_VERSION ?? null,
    nbdkit: process.env.BENCH_NBDKIT_VERSION ?? null,
    rsync: process.env.BENCH_RSYNC_VERSION ?? null,
    targets: present,
    smallWindow: smallWindow === null ? null : { activityWindow: smallWindow, regionSize: smallRegion },
    // Log figures: counter deltas over each whole fio run (ramp included), summed over the runs;
    // per write = sum of the counter / sum of NBD writes answered ok.
  };
  fs.writeFileSync(jsonFile, `${JSON.stringify({ ...meta, rows, resync }, null, 2)}\n`);
}

/** QMP: one JSON object per line each way; returns a function that sends a command and awaits its reply. */
async function qmpConnect(socketPath) {
  const socket = net.connect(socketPath);
  let buffered = '';
  const waiting = [];
  const lines = [];
  socket.setEncoding('utf8');
  socket.on('data', (chunk) => {
    buffered += chunk;
    for (let i = buffered.indexOf('\n'); i >= 0; i = buffered.indexOf('\n')) {
      const line = buffered.slice(0, i).trim();
      buffered = buffered.slice(i + 1);
      if (!line) continue;
      const message = JSON.parse(line);
      if (message.event) continue; // job status events: polled below instead
      if (waiting.length > 0) waiting.shift()(message);
      else lines.push(message);
    }
  });
  await new Promise((resolve, reject) => {
    socket.once('connect', resolve);
    socket.once('error', reject);
  });
  const next = () =>
    lines.length > 0 ? Promise.resolve(lines.shift()) : new Promise((r) => waiting.push(r));
  const greeting = await next();
  if (!greeting.QMP) fail(`QMP: unexpected greeting ${JSON.stringify(greeting)}`);
  const execute = async (command, args) => {
    socket.write(`${JSON.stringify(args ? { execute: command, arguments: args } : { execute: command })}\n`);
    const reply = await next();
    if (reply.error) fail(`QMP ${command}: ${reply.error.desc}`);
    return reply.return;
  };
  return { execute, close: () => socket.end() };
}

async function mirror(socketPath) {
  const qmp = await qmpConnect(socketPath);
  await qmp.execute('qmp_capabilities');
  await qmp.execute('blockdev-mirror', {
    'job-id': 'm0',
    device: 'src',
    target: 'tgt',
    sync: 'full',
    'copy-mode': 'write-blocking',
  });
  const deadline = Date.now() + 300_000;
  for (;;) {
    const jobs = await qmp.execute('query-block-jobs');
    const job = jobs.find((j) => j.device === 'm0');
    if (job === undefined) fail('QMP: the mirror job is gone');
    if (job.ready) break;
    if (Date.now() > deadline) fail('QMP: the mirror was not ready within 300 s');
    await new Promise((r) => setTimeout(r, 100));
  }
  qmp.close();
}

const [command, ...args] = process.argv.slice(2);
if (command === 'port') freePort();
else if (command === 'parse' && args.length === 1) parse(args[0]);
else if (command === 'metrics' && args.length === 1) await metrics(args[0]);
else if (command === 'counter' && args.length === 2) await counter(args[0], args[1]);
else if (command === 'status' && args.length === 2) await status(args[0], args[1]);
else if (command === 'insync' && args.length === 2) await insync(args[0], Number(args[1]));
else if (command === 'consistent' && args.length === 2) await consistent(args[0], Number(args[1]));
else if (command === 'scatter' && args.length === 4)
  await scatter(args[0], args[1], Number(args[2]), Number(args[3]));
else if (command === 'mirror' && args.length === 1) await mirror(args[0]);
else if (command === 'report' && (args.length === 2 || args.length === 4)) report(...args);
else
  fail(
    'usage: fio.mjs port | parse FIO.json | metrics HOST:PORT | counter HOST:PORT NAME | status HOST:PORT FIELD' +
      ' | insync HOST:PORT SECONDS | consistent HOST:PORT SECONDS | scatter HOST:PORT EXPORT COUNT REGION_SIZE | mirror QMP.sock' +
      ' | report SAMPLES.tsv OUT.json [RESYNC.kv RSYNC.txt]',
  );
