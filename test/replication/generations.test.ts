/**
 * The handshake's table against the model (model/gen_model.py): every distinct handshake the
 * exhaustive exploration meets, with the decision the model's rules give, must get the same
 * decision from the code. The model is run here too (python3), so its cases and its verdict
 * ("no violation") are the ones of the model in this tree.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';
import {
  adoptGeneration,
  decideHandshake,
  endResync,
  forcedPromotion,
  type Generations,
  giveUpGeneration,
  type HandshakeDecision,
  parseGenerations,
  startGeneration,
} from '../../src/replication/generations.js';

const run = promisify(execFile);
const ROOT = path.resolve(import.meta.dirname, '../..');
const CASES = path.join(ROOT, 'test/replication/generation-cases.json');

interface ModelGens {
  current: number;
  base: number | null;
  history: number[];
  resync_from?: number | null;
}
interface ModelCase {
  primary: ModelGens;
  secondary: ModelGens;
  decision: string;
}

const MODEL_DECISIONS: Record<string, HandshakeDecision> = {
  resync: 'resync',
  'refuse-newer': 'peerNewer',
  split: 'splitBrain',
  full: 'fullOnRequest',
  unrelated: 'unrelated',
};

const id = (n: number) => n.toString(16).padStart(16, '0');
const fromModel = (g: ModelGens): Generations => ({
  current: id(g.current),
  base: g.base === null ? null : id(g.base),
  history: g.history.map(id),
  resync: g.resync_from === null || g.resync_from === undefined ? null : { from: id(g.resync_from) },
});

test('every handshake of the model gets the model’s decision', async () => {
  const cases = JSON.parse(await readFile(CASES, 'utf8')) as ModelCase[];
  assert.ok(cases.length >= 50, `only ${cases.length} cases`);
  const seen = new Set<string>();
  for (const c of cases) {
    const want = MODEL_DECISIONS[c.decision];
    assert.ok(want, `unknown model decision ${c.decision}`);
    const got = decideHandshake(fromModel(c.primary), fromModel(c.secondary));
    assert.equal(got, want, `P=${JSON.stringify(c.primary)} S=${JSON.stringify(c.secondary)}`);
    seen.add(got);
  }
  for (const d of ['resync', 'peerNewer', 'splitBrain'] as const) assert.ok(seen.has(d), `no ${d} case`);
});

test('the model in this tree finds no violation and gives exactly the committed cases', async () => {
  const dir = await mkdtemp(path.join(tmpdir(), 'volrep-model-'));
  try {
    const dump = path.join(dir, 'cases.json');
    const { stdout } = await run('python3', [
      path.join(ROOT, 'model/gen_model.py'),
      '--depth',
      '12',
      '--writes',
      '3',
      '--dump-cases',
      dump,
    ]);
    assert.match(stdout, /no violation/);
    assert.match(stdout, /states \d+/);
    assert.equal(await readFile(dump, 'utf8'), await readFile(CASES, 'utf8'));
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('each rule the model shows necessary is broken by its flag', async () => {
  for (const flag of [
    'no_rotate',
    'no_union',
    'no_split_rule',
    'no_reverse_split',
    'no_resync_from',
    'no_cut_receiver_rule',
    'demote_keeps_gen',
    'demote_not_atomic',
    'gen_at_end',
    'force_keeps_adopted',
    'force_promote_clears_dirty',
  ]) {
    const r = await run('python3', [
      path.join(ROOT, 'model/gen_model.py'),
      '--depth',
      '12',
      '--flag',
      flag,
    ]).then(
      () => 'passed',
      (err: { stdout?: string }) => err.stdout ?? '',
    );
    assert.match(r, /VIOLATION/, `--flag ${flag}`);
  }
});

const g = (
  current: number | null,
  base: number | null,
  history: number[],
  from?: number | null,
): Generations => ({
  current: current === null ? null : id(current),
  base: base === null ? null : id(base),
  history: history.map(id),
  resync: from === undefined ? null : { from: from === null ? null : id(from) },
});

test('the rows the model never reaches: a replica never synced or in its first full sync, nothing in common, an old generation', () => {
  const p = g(9, 5, [1, 5]);
  assert.equal(decideHandshake(p, g(null, null, [])), 'fullSync');
  assert.equal(decideHandshake(p, g(9, null, [], null)), 'fullSync', 'its first full sync was cut off');
  assert.equal(decideHandshake(p, g(77, null, [])), 'unrelated');
  assert.equal(decideHandshake(p, g(1, null, [])), 'fullOnRequest');
});

test('generation moves: lazy start, give up, adopt at a resync start, end it, forced promotion', () => {
  const g0 = g(1, null, []);
  const g1 = startGeneration(g0, id(2));
  assert.deepEqual(g1, g(2, 1, [1]));
  assert.equal(startGeneration(g1, id(3)), g1, 'one history per time apart');
  assert.deepEqual(giveUpGeneration(g1), g(1, null, [1]));
  const adopted = adoptGeneration(g0, id(2));
  assert.deepEqual(adopted, g(2, null, [1], 1), 'it remembers what it held');
  assert.deepEqual(
    adoptGeneration(adopted, id(3)),
    g(3, null, [1, 2], 1),
    'a second cut-off resync keeps the first',
  );
  assert.deepEqual(endResync(adopted), g(2, null, [1]));
  assert.deepEqual(
    forcedPromotion(adopted, () => id(99)),
    g(1, null, [1]),
    'forced: back to what it held',
  );
  assert.deepEqual(
    forcedPromotion(adoptGeneration(g(null, null, []), id(2)), () => id(99)),
    g(99, null, []),
  );
  assert.deepEqual(startGeneration(g(null, null, []), id(4)), g(4, null, []));
  assert.equal(parseGenerations({ current: 'x', base: null, history: [] }), undefined);
  assert.equal(parseGenerations({ current: null, base: id(1), history: [] }), undefined);
  assert.equal(parseGenerations({ ...g1, resync: { from: 7 } }), undefined);
  assert.deepEqual(parseGenerations(g1), g1);
  assert.deepEqual(parseGenerations(adopted), adopted);
});
