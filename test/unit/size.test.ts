import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { VolrepError } from '../../src/errors.js';
import { formatSize, parseDuration, parseSize } from '../../src/util/size.js';

describe('parseSize', () => {
  it('accepts bytes and K/M/G/T suffixes as powers of 1024', () => {
    assert.equal(parseSize('4096'), 4096);
    assert.equal(parseSize('64K'), 65536);
    assert.equal(parseSize('64k'), 65536);
    assert.equal(parseSize('256M'), 256 * 1024 ** 2);
    assert.equal(parseSize('1G'), 1024 ** 3);
    assert.equal(parseSize('1T'), 1024 ** 4);
    assert.equal(parseSize('1GiB'), 1024 ** 3);
  });

  it('refuses garbage with a VOLREP_ERR_SIZE error naming the flag', () => {
    for (const bad of ['', 'abc', '-1', '1.5G', '1P', '64 K', '0x10', '1e9', 'K']) {
      assert.throws(
        () => parseSize(bad, '--size'),
        (err: unknown) =>
          err instanceof VolrepError && err.code === 'VOLREP_ERR_SIZE' && err.message.includes('--size'),
        `expected refusal of '${bad}'`,
      );
    }
  });

  it('refuses sizes beyond the safe integer range', () => {
    assert.throws(() => parseSize('99999999999T'), VolrepError);
  });

  it('round-trips with formatSize', () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 2 ** 40 }), (n) => parseSize(formatSize(n)) === n),
      { numRuns: 500 },
    );
  });
});

describe('parseDuration', () => {
  it('parses ms, s, m and bare seconds', () => {
    assert.equal(parseDuration('250ms'), 250);
    assert.equal(parseDuration('5s'), 5000);
    assert.equal(parseDuration('5'), 5000);
    assert.equal(parseDuration('1m'), 60_000);
    assert.throws(() => parseDuration('soon'), VolrepError);
  });
});
