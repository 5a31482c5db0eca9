/**
 * A checkpoint persists the indicator map piece by piece while the engine goes on changing it
 * (FrozenBits: copy-on-write per piece, instead of a 30 MiB snapshot per checkpoint for 15 TiB).
 * Property: whatever the map does between pieces, the pieces read back are the bits at the
 * freeze plus the extra regions — and the bitmap file written from them opens to that image.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { FROZEN_PIECE_WORDS, IndicatorMap } from '../../src/core/indicator-map.js';
import { BitmapFile } from '../../src/log/bitmap-file.js';
import { SimDisk } from '../sim/sim-disk.js';

const PIECE_REGIONS = FROZEN_PIECE_WORDS * 32;
/** Three and a bit pieces: the last one short. */
const REGIONS = PIECE_REGIONS * 3 + 1000;

type Change =
  | { kind: 'set' | 'reset'; region: number }
  | { kind: 'setAll' }
  | { kind: 'union'; region: number };

const region = fc.integer({ min: 0, max: REGIONS - 1 });
/** Regions near piece boundaries are where a copy-on-write slip would show. */
const edgy = fc.oneof(
  region,
  fc
    .integer({ min: 0, max: 3 })
    .chain((p) =>
      fc.integer({ min: -2, max: 2 }).map((d) => Math.min(REGIONS - 1, Math.max(0, p * PIECE_REGIONS + d))),
    ),
);
const change: fc.Arbitrary<Change> = fc.oneof(
  {
    weight: 10,
    arbitrary: fc.record({ kind: fc.constantFrom('set' as const, 'reset' as const), region: edgy }),
  },
  { weight: 1, arbitrary: fc.constant({ kind: 'setAll' as const }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('union' as const), region: edgy }) },
);

function apply(map: IndicatorMap, c: Change): void {
  if (c.kind === 'set') map.set(c.region);
  else if (c.kind === 'reset') map.reset(c.region);
  else if (c.kind === 'setAll') map.setAll();
  else {
    const other = new IndicatorMap(REGIONS);
    other.set(c.region);
    map.union(other.snapshot());
  }
}

describe('a frozen image of the indicator map', () => {
  it('reads back the bits at the freeze plus the extras, whatever changes between pieces', () => {
    fc.assert(
      fc.property(
        fc.array(edgy, { maxLength: 40 }),
        fc.array(edgy, { maxLength: 5 }),
        fc.array(fc.array(change, { maxLength: 6 }), { minLength: 5, maxLength: 5 }),
        (before, extra, between) => {
          const map = new IndicatorMap(REGIONS);
          for (const r of before) map.set(r);
          const expected = map.snapshot();
          for (const r of extra) expected[r >>> 3] |= 1 << (r & 7);
          const frozen = map.freeze(extra);
          assert.equal(frozen.pieceCount, 4);
          const got = new Uint8Array(frozen.byteLength);
          let at = 0;
          for (let p = 0; p < frozen.pieceCount; p++) {
            for (const c of between[p]) apply(map, c);
            const piece = frozen.take();
            got.set(piece, at);
            at += piece.length;
          }
          for (const c of between[4]) apply(map, c);
          frozen.release();
          assert.deepEqual(got, expected);
          // Released: the map is free to freeze again.
          map.freeze([]).release();
        },
      ),
      { numRuns: 200 },
    );
  });

  it('a bitmap file persisted from it while the map changes opens to the frozen image', async () => {
    const disk = new SimDisk(BitmapFile.fileBytes(REGIONS));
    await BitmapFile.format(disk, REGIONS);
    const { file } = await BitmapFile.open(disk, REGIONS);
    const map = new IndicatorMap(REGIONS);
    for (const r of [0, 5, PIECE_REGIONS - 1, PIECE_REGIONS, 2 * PIECE_REGIONS + 7, REGIONS - 1]) map.set(r);
    const expected = map.snapshot();
    expected[(3 * PIECE_REGIONS) >>> 3] |= 1; // the extra region
    const frozen = map.freeze([3 * PIECE_REGIONS]);
    const persisting = file.persist(frozen, 4096, 9);
    // The engine carries on while the pieces are written.
    for (let i = 0; i < 40; i++) {
      map.reset(PIECE_REGIONS);
      map.set(2 * PIECE_REGIONS + 100 + i);
      map.reset(REGIONS - 1);
      await new Promise((r) => setImmediate(r));
    }
    await persisting;
    frozen.release();
    disk.syncSync();
    const { bitmap } = await BitmapFile.open(disk, REGIONS);
    assert.equal(bitmap.coveredLsn, 4096);
    assert.deepEqual(new Uint8Array(bitmap.bits), expected);
  });
});
