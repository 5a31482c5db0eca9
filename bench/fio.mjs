// Helpers for bench/nbd.sh (plain Node, no dependencies).
//
//   node bench/fio.mjs port                      a free TCP port on 127.0.0.1
//   node bench/fio.mjs parse FIO.json            "iops bw_bytes lat_us" of the job (read or write side);
//                                                exits 1 if fio reported an error or did no I/O
//   node bench/fio.mjs report SAMPLES.tsv OUT.json
//                                                medians per row and server, ratio volrep/nbdkit,
//                                                a table on stdout and the same as JSON in OUT.json
//
// SAMPLES.tsv lines: row server repeat iops bw_bytes lat_us cpu_pct
import fs from 'node:fs';
import net from 'node:net';

const ROWS = [
  { row: 'randwrite-4k-qd32', label: '4 KiB randwrite QD32', unit: 'IOPS' },
  { row: 'randwrite-4k-qd1', label: '4 KiB randwrite QD1', unit: 'IOPS' },
  { row: 'write-1m-qd8', label: '1 MiB seq write QD8', unit: 'MB/s' },
  { row: 'randread-4k-qd32', label: '4 KiB randread QD32', unit: 'IOPS' },
];

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

function median(values) {
  const v = [...values].sort((a, b) => a - b);
  if (v.length === 0) return Number.NaN;
  const mid = Math.floor(v.length / 2);
  return v.length % 2 ? v[mid] : (v[mid - 1] + v[mid]) / 2;
}

function report(samplesFile, jsonFile) {
  const samples = fs
    .readFileSync(samplesFile, 'utf8')
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((l) => {
      const [row, server, repeat, iops, bw, lat, cpu] = l.split(/\s+/);
      return { row, server, repeat: +repeat, iops: +iops, bwBytes: +bw, latUs: +lat, cpuPct: +cpu };
    });
  const rows = [];
  for (const def of ROWS) {
    const entry = { row: def.row, label: def.label, unit: def.unit };
    for (const server of ['nbdkit', 'volrep']) {
      const mine = samples.filter((s) => s.row === def.row && s.server === server);
      const values = mine.map((s) => (def.unit === 'MB/s' ? s.bwBytes / 1e6 : s.iops));
      entry[server] = {
        median: median(values),
        samples: values,
        latUsMedian: median(mine.map((s) => s.latUs)),
        cpuPctMedian: median(mine.map((s) => s.cpuPct)),
      };
    }
    entry.ratio = entry.volrep.median / entry.nbdkit.median;
    rows.push(entry);
  }
  const fmt = (n, unit) =>
    Number.isFinite(n) ? (unit === 'MB/s' ? n.toFixed(0) : Math.round(n).toLocaleString('en-US')) : 'n/a';
  const table = [
    ['row', 'unit', 'nbdkit', 'volrep', 'volrep/nbdkit', 'lat µs nbdkit/volrep', 'CPU% nbdkit/volrep'],
    ...rows.map((r) => [
      r.label,
      r.unit,
      fmt(r.nbdkit.median, r.unit),
      fmt(r.volrep.median, r.unit),
      Number.isFinite(r.ratio) ? `${r.ratio.toFixed(2)}×` : 'n/a',
      `${r.nbdkit.latUsMedian.toFixed(0)} / ${r.volrep.latUsMedian.toFixed(0)}`,
      `${r.nbdkit.cpuPctMedian.toFixed(0)} / ${r.volrep.cpuPctMedian.toFixed(0)}`,
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
  };
  fs.writeFileSync(jsonFile, `${JSON.stringify({ ...meta, rows }, null, 2)}\n`);
}

const [command, ...args] = process.argv.slice(2);
if (command === 'port') freePort();
else if (command === 'parse' && args.length === 1) parse(args[0]);
else if (command === 'report' && args.length === 2) report(args[0], args[1]);
else fail('usage: fio.mjs port | parse FIO.json | report SAMPLES.tsv OUT.json');
