/**
 * `npm run sim:mutants`: breaks, one at a time, a rule the simulator must guard (or reverts a
 * fixed defect), in a scratch copy of the project, and runs seeds until the simulator catches
 * it. Prints how many seeds each took; a mutant that survives `--seeds` seeds (or its own
 * `seedsAtLeast`, for the rare ones) fails the run.
 *
 *   npm run sim:mutants                       every mutant, up to 2000 seeds each
 *   npm run sim:mutants -- --only fua-barrier --seeds 500
 */
import { execFileSync } from 'node:child_process';
import { cpSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

interface Mutant {
  name: string;
  what: string;
  file: string;
  find: string;
  replace: string;
  /** Seeds to allow at least, whatever `--seeds` says: this one is rare (one seed in thousands). */
  seedsAtLeast?: number;
}

export const MUTANTS: Mutant[] = [
  {
    name: 'revert-1-h17',
    what: 'defect 1 back: a restarted primary resyncs from the page cache before syncing the volume',
    file: 'src/core/engine.ts',
    find: '    this.volumeTrusted = this.volumeWritesDurable;\n    if (!this.volumeTrusted) this.issueVolumeSync();',
    replace: '    this.volumeTrusted = true;',
  },
  {
    name: 'revert-2-fua-barrier',
    what: 'defect 2 back: a FUA write is no barrier on the stream',
    file: 'src/core/engine.ts',
    find: "if (tx.fua) this.pushBarrier('flush', txOps[txOps.length - 1].id);",
    replace: '',
  },
  {
    name: 'revert-3-log-race',
    what: 'defect 3 back: records appended while the log header is written join the batch',
    file: 'src/log/log-file.ts',
    find: `      const start = this.written;
      const bytes = concat(this.pending, this.pendingBytes);
      this.pending = [];
      this.pendingBytes = 0;
      const tail = this.pendingTail;
      if (tail !== this.durableTail) await this.writeHeader(tail);`,
    replace: `      if (this.pendingTail !== this.durableTail) await this.writeHeader();
      const start = this.written;
      const bytes = concat(this.pending, this.pendingBytes);
      this.pending = [];
      this.pendingBytes = 0;`,
  },
  {
    name: 'revert-bitmap-open-sync',
    what: 'found by the simulator: opening the bitmap trusts a slot a killed process left unsynced',
    file: 'src/log/bitmap-file.ts',
    find: '    await file.sync();\n    const slotBytes = BitmapFile.slotBytes(regionCount);',
    replace: '    const slotBytes = BitmapFile.slotBytes(regionCount);',
  },
  {
    name: 'revert-log-open-sync',
    what: 'found by the 100,000-seed run: opening the log trusts a header a killed process left unsynced',
    file: 'src/log/log-file.ts',
    find: '    await file.sync();\n    const header = await readHeader(file);',
    replace: '    const header = await readHeader(file);',
    seedsAtLeast: 16000,
  },
  {
    name: 'no-secondary-fdatasync',
    what: 'the secondary acks without syncing the replica',
    file: 'src/replication/applier.ts',
    find: `      await new Promise<void>((resolve, reject) =>
        this.device.flush((err) => (err ? reject(err) : resolve())),
      );
      const record = this.record(target);`,
    replace: '      const record = this.record(target);',
  },
  {
    name: 'ack-before-replica-sync',
    what: 'the secondary acks a batch before its data is synced (the record still waits for it)',
    file: 'src/replication/applier.ts',
    find: `    try {
      // Data first, then the record that says it is there (H14).`,
    replace: `    if (target.lastAppliedUpdate > this.durable.lastAppliedUpdate) this.onDurable({ ...target });
    try {
      // Data first, then the record that says it is there (H14).`,
  },
  {
    name: 'barrier-no-sync-point',
    what: 'a barrier is not a sync point on the secondary',
    file: 'src/replication/applier.ts',
    find: "      if (op.kind === 'resyncBegin') this.consistentWanted = false;",
    replace:
      "      if (op.kind === 'resyncBegin') this.consistentWanted = false;\n      if (op.kind === 'barrier') continue;",
  },
  {
    name: 'sync-gate-off',
    what: 'sync mode completes a write before the secondary wrote it',
    file: 'src/core/engine.ts',
    find: '    if (this.syncMode && (tx.fua ? tx.unsettled : tx.unwritten) > 0) return;',
    replace: '',
  },
  {
    name: 'sync-flush-local-only',
    what: 'sync mode completes a FLUSH without waiting for the replica to make its writes durable',
    file: 'src/core/engine.ts',
    find: '    if (this.syncMode && this.connected && afterId > this.ackedId)',
    replace: '    if (this.syncMode && this.connected && afterId > this.ackedId && false)',
  },
  {
    name: 'sync-delay-never-fires',
    what: 'the secondary leaves a small batch unsynced when nothing asks for it (the delay timer is never armed)',
    file: 'src/replication/applier.ts',
    find: '    this.syncTimer ??= this.opts.clock.setTimer(',
    replace: '    if (Math.random() < 2) return;\n    this.syncTimer ??= this.opts.clock.setTimer(',
  },
  {
    name: 'written-before-write',
    what: 'the secondary reports an update written as soon as it arrives',
    file: 'src/replication/applier.ts',
    find: '      this.acceptedId = id;',
    replace: '      this.acceptedId = id;\n      this.onWritten(id);',
  },
  {
    name: 'reset-on-first-ack',
    what: "an ack resets a region's indicator though newer updates to it are pending",
    file: 'src/core/engine.ts',
    find: '      if (entry.count > 0) continue;\n      this.pending.delete(r);',
    replace:
      '      if (!lost) this.indicator.reset(r);\n      if (entry.count > 0) continue;\n      this.pending.delete(r);',
  },
  {
    name: 'h1-hot-skips-log',
    what: 'H1: a hot region keeps its coverage across a checkpoint and skips its next log record',
    file: 'src/core/engine.ts',
    find: '    this.cover.clear();\n    this.lruHead = null;\n    this.lruTail = null;',
    replace: '',
  },
];

function main(): void {
  const args = process.argv.slice(2);
  const value = (flag: string) => {
    const i = args.indexOf(flag);
    return i >= 0 ? args[i + 1] : undefined;
  };
  const seeds = Number(value('--seeds') ?? 2000);
  const only = value('--only');
  const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
  const rows: string[] = [];
  let survivors = 0;
  for (const m of MUTANTS.filter((x) => only === undefined || x.name === only)) {
    const scratch = mkdtempSync(path.join(tmpdir(), `volrep-mutant-${m.name}-`));
    try {
      for (const dir of ['src', 'test'])
        cpSync(path.join(root, dir), path.join(scratch, dir), { recursive: true });
      cpSync(path.join(root, 'package.json'), path.join(scratch, 'package.json'));
      cpSync(path.join(root, 'tsconfig.json'), path.join(scratch, 'tsconfig.json'));
      symlinkSync(path.join(root, 'node_modules'), path.join(scratch, 'node_modules'));
      const file = path.join(scratch, m.file);
      const text = readFileSync(file, 'utf8');
      if (!text.includes(m.find))
        throw new Error(`mutant ${m.name}: the code it breaks is not in ${m.file} any more`);
      writeFileSync(file, text.replace(m.find, m.replace));
      const budget = Math.max(seeds, m.seedsAtLeast ?? 0);
      const started = performance.now();
      let out: string;
      try {
        out = execFileSync(
          process.execPath,
          ['--import', 'tsx', 'test/sim/main.ts', '--seeds', String(budget), '--until-fail', '--quiet'],
          {
            cwd: scratch,
            encoding: 'utf8',
            stdio: ['ignore', 'pipe', 'pipe'],
          },
        );
      } catch (err) {
        out = String((err as { stdout?: string }).stdout ?? '');
      }
      const seconds = ((performance.now() - started) / 1000).toFixed(1);
      const after = /first failure after (\d+) seed/.exec(out);
      const check = /simulation FAILED \((\w+)\)[^\n]*\n {2}([^\n]*)/.exec(out);
      if (after) {
        rows.push(
          `${m.name.padEnd(26)} caught after ${after[1].padStart(5)} seed(s), ${seconds} s — ${check?.[1]}: ${check?.[2].slice(0, 110)}`,
        );
      } else {
        survivors += 1;
        rows.push(`${m.name.padEnd(26)} SURVIVED ${budget} seeds (${seconds} s) — ${m.what}`);
      }
      process.stdout.write(`${rows[rows.length - 1]}\n`);
    } finally {
      rmSync(scratch, { recursive: true, force: true });
    }
  }
  process.stdout.write(`\n${rows.join('\n')}\n`);
  if (survivors > 0) process.exit(1);
}

main();
