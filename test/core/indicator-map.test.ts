import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { IndicatorMap } from '../../src/core/indicator-map.js';

const seed = process.env.VOLREP_SEED ? Number(process.env.VOLREP_SEED) : undefined;

describe('IndicatorMap', () => {
  it('sets, resets and tests bits, keeping a running count', () => {
    const m = new IndicatorMap(100);
    assert.equal(m.count, 0);
    assert.equal(m.set(3), false);
    assert.equal(m.set(3), true);
    assert.equal(m.set(31), false);
    assert.equal(m.set(32), false);
    assert.equal(m.set(99), false);
    assert.equal(m.count, 4);
    assert.ok(m.test(3) && m.test(31) && m.test(32) && m.test(99));
    assert.ok(!m.test(4) && !m.test(0));
    assert.equal(m.reset(3), true);
    assert.equal(m.reset(3), false);
    assert.equal(m.count, 3);
    assert.deepEqual([...m.iterate()], [31, 32, 99]);
  });

  it('refuses regions out of range', () => {
    const m = new IndicatorMap(10);
    assert.throws(() => m.set(10));
    assert.throws(() => m.test(-1));
    assert.throws(() => m.reset(1.5));
  });

  it('finds the next set bit across empty words', () => {
    const m = new IndicatorMap(1 << 20);
    m.set(5);
    m.set(1_000_000);
    m.set((1 << 20) - 1);
    assert.equal(m.nextSet(0), 5);
    assert.equal(m.nextSet(5), 5);
    assert.equal(m.nextSet(6), 1_000_000);
    assert.equal(m.nextSet(1_000_001), (1 << 20) - 1);
    assert.equal(m.nextSet(1 << 20), -1);
    m.reset((1 << 20) - 1);
    assert.equal(m.nextSet(1_000_001), -1);
  });

  it('handles bit 31 of a word (the sign bit)', () => {
    const m = new IndicatorMap(64);
    m.set(31);
    m.set(63);
    assert.deepEqual([...m.iterate()], [31, 63]);
    assert.equal(m.nextSet(32), 63);
  });

  it('round-trips through bytes, region i in byte i >> 3 bit i & 7', () => {
    const m = new IndicatorMap(70);
    m.set(0);
    m.set(9);
    m.set(69);
    const bytes = m.snapshot();
    assert.equal(bytes.length, IndicatorMap.byteLength(70));
    assert.equal(bytes[0], 1);
    assert.equal(bytes[1], 2);
    assert.equal(bytes[8], 1 << 5);
    const copy = IndicatorMap.fromBytes(70, bytes);
    assert.equal(copy.count, 3);
    assert.deepEqual([...copy.iterate()], [0, 9, 69]);
    // A snapshot is a copy: later changes do not show in it.
    m.set(1);
    assert.equal(bytes[0], 1);
  });

  it('refuses snapshots of the wrong size or with bits beyond the last region', () => {
    assert.throws(() => IndicatorMap.fromBytes(70, new Uint8Array(4)), { code: 'VOLREP_ERR_BITMAP_SIZE' });
    const bytes = new Uint8Array(IndicatorMap.byteLength(70));
    bytes[11] = 0x80;
    assert.throws(() => IndicatorMap.fromBytes(70, bytes), { code: 'VOLREP_ERR_BITMAP_CORRUPT' });
    // countOf checks without building a map: the same refusals.
    assert.throws(() => IndicatorMap.countOf(70, new Uint8Array(4)), { code: 'VOLREP_ERR_BITMAP_SIZE' });
    assert.throws(() => IndicatorMap.countOf(70, bytes), { code: 'VOLREP_ERR_BITMAP_CORRUPT' });
    assert.throws(() => new IndicatorMap(70).union(bytes), { code: 'VOLREP_ERR_BITMAP_CORRUPT' });
  });

  it('union sets the bits of another snapshot and keeps the count', () => {
    const a = new IndicatorMap(40);
    a.set(1);
    a.set(33);
    const b = new IndicatorMap(40);
    b.set(33);
    b.set(39);
    a.union(b.snapshot());
    assert.deepEqual([...a.iterate()], [1, 33, 39]);
    assert.equal(a.count, 3);
  });

  it('agrees with a Set under random operations', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 300 }),
        fc.array(fc.tuple(fc.boolean(), fc.nat()), { maxLength: 200 }),
        (n, ops) => {
          const m = new IndicatorMap(n);
          const ref = new Set<number>();
          for (const [add, x] of ops) {
            const r = x % n;
            if (add) {
              assert.equal(m.set(r), ref.has(r));
              ref.add(r);
            } else {
              assert.equal(m.reset(r), ref.has(r));
              ref.delete(r);
            }
          }
          assert.equal(m.count, ref.size);
          assert.deepEqual(
            [...m.iterate()],
            [...ref].sort((x, y) => x - y),
          );
          const copy = IndicatorMap.fromBytes(n, m.snapshot());
          assert.equal(copy.count, ref.size);
          // Also from a snapshot that does not start on a word (a view into a received frame).
          const unaligned = new Uint8Array(m.snapshot().length + 1).subarray(1);
          unaligned.set(m.snapshot());
          assert.equal(IndicatorMap.countOf(n, unaligned), ref.size);
          const merged = new IndicatorMap(n);
          merged.set(0);
          merged.union(unaligned);
          assert.equal(merged.count, ref.size + (ref.has(0) ? 0 : 1));
          for (let r = 0; r < n; r++) assert.equal(copy.test(r), ref.has(r));
        },
      ),
      { seed, numRuns: 300 },
    );
  });

  it('holds 256M regions (16 TiB at 64 KiB) and iterates a sparse map fast', () => {
    const regions = 2 ** 28;
    const m = new IndicatorMap(regions);
    m.set(regions - 1);
    m.set(12345678);
    const t0 = performance.now();
    assert.deepEqual([...m.iterate()], [12345678, regions - 1]);
    const ms = performance.now() - t0;
    assert.ok(ms < 1000, `iterating took ${ms} ms`);
    assert.equal(IndicatorMap.fromBytes(regions, m.snapshot()).count, 2);
  });
});
