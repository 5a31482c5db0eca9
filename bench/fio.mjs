// Helpers for bench/nbd.sh (plain Node, no dependencies).
//
//   node bench/fio.mjs port                      a free TCP port on 127.0.0.1
//   node bench/fio.mjs parse FIO.json            "iops bw_bytes lat_us" of the job (read or write side);
//                                                exits 1 if fio reported an error or did no I/O
//   node bench/fio.mjs metrics HOST:PORT         "writes log_syncs log_records bitmap_persists volume_syncs"
//                                                from volrep's GET /metrics (counters since start);
//                                                exits 1 if unreachable or a counter is missing
//   node bench/fio.mjs report SAMPLES.tsv OUT.json
//                                                medians per row and server, ratio volrep/nbdkit, log
//                                                syncs and records per write, a table on stdout and the
//                                                same as JSON in OUT.json
//
// SAMPLES.tsv lines: row server repeat iops bw_bytes lat_us cpu_pct writes log_syncs log_records
// bitmap_persists volume_syncs (the last five are deltas over the fio run, '-' for nbdkit).
// Servers: nbdkit, volrep (defaults), volrep-small (small activity window, see nbd.sh).
import fs from 'node:fs';
import net from 'node:net';

const ROWS = [
  { row: 'randwrite-4k-qd32', label: '4 KiB randwrite QD32', unit: 'IOPS', writes: true },
  { row: 'randwrite-4k-qd1', label: '4 KiB randwrite QD1', unit: 'IOPS', writes: true },
  { row: 'write-1m-qd8', label: '1 MiB seq write QD8', unit: 'MB/s', writes: true },
  { row: 'randread-4k-qd32', label: '4 KiB randread QD32', unit: 'IOPS', writes: false },
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
  process.stdout.write(`${side.iops.toFixed(1)} ${side.bw_bytes} ${latUs.toFixed(1)}\n`);
}

async function metrics(address) {
  let text;
  try {
    const res = await fetch(`http://${address}/metrics`, { signal: AbortSignal.timeout(5000) });
    if (!res.ok) fail(`GET http://${address}/metrics: HTTP ${res.status}`);
    text = await res.text();
  } catch (err) {
    fail(`GET http://${address}/metrics: ${err.message}`);
  }
  const values = new Map();
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const sep = line.lastIndexOf(' ');
    values.set(line.slice(0, sep), Number(line.slice(sep + 1)));
  }
  const out = SERIES.map((name) => {
    const v = values.get(name);
    if (!Number.isFinite(v)) fail(`GET http://${address}/metrics: no ${name}`);
    return v;
  });
  process.stdout.write(`${out.join(' ')}\n`);
}

function median(values) {
  const v = [...values].sort((a, b) => a - b);
  if (v.length === 0) return Number.NaN;
  const mid = Math.floor(v.length / 2);
  return v.length % 2 ? v[mid] : (v[mid - 1] + v[mid]) / 2;
}

const num = (text) => (text === undefined || text === '-' ? null : Number(text));

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

function report(samplesFile, jsonFile) {
  const samples = fs
    .readFileSync(samplesFile, 'utf8')
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((l) => {
      const [row, server, repeat, iops, bw, lat, cpu, ...log] = l.split(/\s+/);
      const counts = log.map(num);
      return {
        row,
        server,
        repeat: +repeat,
        iops: +iops,
        bwBytes: +bw,
        latUs: +lat,
        cpuPct: +cpu,
        log:
          counts.length === LOG_FIELDS.length && counts.every((c) => c !== null)
            ? Object.fromEntries(LOG_FIELDS.map((f, i) => [f, counts[i]]))
            : null,
      };
    });
  const smallWindow = process.env.BENCH_SMALL_WINDOW ?? null;
  const smallRegion = process.env.BENCH_SMALL_REGION ?? null;
  const summary = (def, server) => {
    const mine = samples.filter((s) => s.row === def.row && s.server === server);
    const values = mine.map((s) => (def.unit === 'MB/s' ? s.bwBytes / 1e6 : s.iops));
    return {
      median: median(values),
      samples: values,
      latUsMedian: median(mine.map((s) => s.latUs)),
      cpuPctMedian: median(mine.map((s) => s.cpuPct)),
      log: def.writes ? logFigures(mine) : null,
    };
  };
  const rows = [];
  for (const def of ROWS) {
    const nbdkit = summary(def, 'nbdkit');
    const variants = [{ server: 'volrep', variant: 'default', label: def.label, volrepConfig: null }];
    if (def.writes && samples.some((s) => s.row === def.row && s.server === 'volrep-small')) {
      variants.push({
        server: 'volrep-small',
        variant: 'small-window',
        label: `${def.label}, window ${smallWindow}/${smallRegion} regions`,
        volrepConfig: { activityWindow: smallWindow, regionSize: smallRegion },
      });
    }
    for (const v of variants) {
      const volrep = summary(def, v.server);
      rows.push({
        row: def.row,
        variant: v.variant,
        label: v.label,
        unit: def.unit,
        volrepConfig: v.volrepConfig,
        nbdkit: { ...nbdkit, log: undefined },
        volrep,
        ratio: volrep.median / nbdkit.median,
      });
    }
  }
  const fmt = (n, unit) =>
    Number.isFinite(n) ? (unit === 'MB/s' ? n.toFixed(0) : Math.round(n).toLocaleString('en-US')) : 'n/a';
  const perWrite = (n) =>
    n === null || n === undefined ? '-' : n < 0.0005 && n > 0 ? n.toExponential(1) : n.toFixed(3);
  const table = [
    [
      'row',
      'unit',
      'nbdkit',
      'volrep',
      'volrep/nbdkit',
      'lat µs nbdkit/volrep',
      'CPU% nbdkit/volrep',
      'log syncs/write',
      'log records/write',
    ],
    ...rows.map((r) => [
      r.label,
      r.unit,
      fmt(r.nbdkit.median, r.unit),
      fmt(r.volrep.median, r.unit),
      Number.isFinite(r.ratio) ? `${r.ratio.toFixed(2)}×` : 'n/a',
      `${r.nbdkit.latUsMedian.toFixed(0)} / ${r.volrep.latUsMedian.toFixed(0)}`,
      `${r.nbdkit.cpuPctMedian.toFixed(0)} / ${r.volrep.cpuPctMedian.toFixed(0)}`,
      perWrite(r.volrep.log?.syncsPerWrite),
      perWrite(r.volrep.log?.recordsPerWrite),
    ]),
  ];
  const widths = table[0].map((_, i) => Math.max(...table.map((line) => line[i].length)));
  const line = (cells) =>
    `| ${cells.map((c, i) => (i < 2 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join(' | ')} |`;
  const out = [
    line(table[0]),
    `|${widths.map((w, i) => (i < 2 ? `:${'-'.repeat(w + 1)}` : `${'-'.repeat(w + 1)}:`)).join('|')}|`,
  ];
  for (const cells of table.slice(1)) out.push(line(cells));
  process.stdout.write(`${out.join('\n')}\n`);
  const meta = {
    date: new Date().toISOString(),
    runtimeSeconds: Number(process.env.BENCH_RUNTIME ?? 4),
    repeats: Number(process.env.BENCH_REPEATS ?? 3),
    node: process.version,
    fio: process.env.BENCH_FIO_VERSION ?? null,
    nbdkit: process.env.BENCH_NBDKIT_VERSION ?? null,
    smallWindow: smallWindow === null ? null : { activityWindow: smallWindow, regionSize: smallRegion },
    // Log figures: counter deltas over each whole fio run (ramp included), summed over the runs;
    // per write = sum of the counter / sum of NBD writes answered ok.
  };
  fs.writeFileSync(jsonFile, `${JSON.stringify({ ...meta, rows }, null, 2)}\n`);
}

const [command, ...args] = process.argv.slice(2);
if (command === 'port') freePort();
else if (command === 'parse' && args.length === 1) parse(args[0]);
else if (command === 'metrics' && args.length === 1) await metrics(args[0]);
else if (command === 'report' && args.length === 2) report(args[0], args[1]);
else fail('usage: fio.mjs port | parse FIO.json | metrics HOST:PORT | report SAMPLES.tsv OUT.json');
