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
  for (const flag of ['no_rotate', 'no_union', 'no_split_rule', 'demote_keeps_gen', 'demote_not_atomic']) {
    const r = await run('python3', [
      path.join(ROOT, 'model/gen_model.py'),
      '--depth',
      '9',
      '--flag',
      flag,
    ]).then(
      () => 'passed',
      (err: { stdout?: string }) => err.stdout ?? '',
    );
    assert.match(r, /VIOLATION/, `--flag ${flag}`);
  }
});

test('the rows the model never reaches: a replica never synced, nothing in common, an old generation', () => {
  const p: Generations = { current: id(9), base: id(5), history: [id(1), id(5)] };
  assert.equal(decideHandshake(p, { current: null, base: null, history: [] }), 'fullSync');
  assert.equal(decideHandshake(p, { current: id(77), base: null, history: [] }), 'unrelated');
  assert.equal(decideHandshake(p, { current: id(1), base: null, history: [] }), 'fullOnRequest');
});

test('generation moves: lazy start, give up, adopt', () => {
  const g0: Generations = { current: id(1), base: null, history: [] };
  const g1 = startGeneration(g0, id(2));
  assert.deepEqual(g1, { current: id(2), base: id(1), history: [id(1)] });
  assert.equal(startGeneration(g1, id(3)), g1, 'one history per time apart');
  assert.deepEqual(giveUpGeneration(g1), { current: id(1), base: null, history: [id(1)] });
  assert.deepEqual(adoptGeneration(g0, id(2)), { current: id(2), base: null, history: [id(1)] });
  assert.deepEqual(startGeneration({ current: null, base: null, history: [] }, id(4)), {
    current: id(4),
    base: null,
    history: [],
  });
  assert.equal(parseGenerations({ current: 'x', base: null, history: [] }), undefined);
  assert.equal(parseGenerations({ current: null, base: id(1), history: [] }), undefined);
  assert.deepEqual(parseGenerations(g1), g1);
});
