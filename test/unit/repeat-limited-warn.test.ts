import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import pino from 'pino';
import { REPEAT_LOG_INTERVAL_MS, repeatLimitedWarn } from '../../src/daemon/logger.js';

describe('repeatLimitedWarn', () => {
  it('logs a repeated reason once per interval, with how many were left out', () => {
    const lines: Record<string, unknown>[] = [];
    const logger = pino({}, { write: (s: string) => lines.push(JSON.parse(s)) });
    let now = 0;
    const warn = repeatLimitedWarn(logger, 'refused', () => now);
    for (let i = 0; i < 5; i++) {
      warn({ reason: 'bad certificate', peer: `p${i}` });
      now += 250;
    }
    assert.equal(lines.length, 1);
    warn({ reason: 'another reason' });
    assert.equal(lines.length, 2, 'a different reason is logged at once');
    warn({ reason: 'bad certificate' });
    assert.equal(lines.length, 3, 'and then the first one again');
    warn({ reason: 'bad certificate' });
    now += REPEAT_LOG_INTERVAL_MS;
    warn({ reason: 'bad certificate' });
    assert.equal(lines.length, 4);
    assert.equal(lines[3].repeatedSinceLastLine, 1);
    assert.equal(lines[3].msg, 'refused');
    assert.equal(lines[3].level, 40);
  });
});
