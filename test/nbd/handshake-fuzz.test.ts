/**
 * Hostile input for the negotiation state machine: random and mutated client byte streams, split
 * at arbitrary chunk boundaries, against an independent framing of what the client sent.
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import fc from 'fast-check';
import { ChunkQueue } from '../../src/io/chunk-queue.js';
import { type ExportInfo, Handshake, type HandshakeOutcome } from '../../src/nbd/handshake.js';
import * as P from '../../src/nbd/protocol.js';
import {
  arbCuts,
  arbMutation,
  bytewise,
  clientFlags,
  fcParams,
  infoData,
  isErrorReply,
  metaData,
  mutate,
  type OptionReply,
  option,
  parseOptionReplies,
  requestHeader,
  splitAt,
  splitNegotiation,
  u16,
  u32,
} from './wire.js';

const EXPORT: ExportInfo = {
  name: 'volrep',
  description: 'volrep volume',
  size: 4 * 1024 * 1024 + 512,
  flags:
    P.TFLAG_HAS_FLAGS |
    P.TFLAG_SEND_FLUSH |
    P.TFLAG_SEND_FUA |
    P.TFLAG_SEND_TRIM |
    P.TFLAG_SEND_WRITE_ZEROES |
    P.TFLAG_SEND_DF |
    P.TFLAG_CAN_MULTI_CONN,
};

interface Run {
  output: Buffer;
  outcome: HandshakeOutcome | undefined;
  /** Bytes of the input the handshake consumed. */
  consumed: number;
}

/** Feeds `chunks` one by one, as a socket would, until an outcome; never more calls than chunks. */
function drive(chunks: Buffer[], shuttingDown = false): Run {
  const hs = new Handshake(EXPORT, () => shuttingDown);
  const greeting = hs.greeting();
  assert.equal(greeting.length, 18);
  assert.equal(greeting.readBigUInt64BE(0), P.NBD_MAGIC);
  assert.equal(greeting.readBigUInt64BE(8), P.IHAVEOPT);
  const queue = new ChunkQueue();
  const out: Buffer[] = [];
  let outcome: HandshakeOutcome | undefined;
  let fed = 0;
  let total = 0;
  for (const c of chunks) total += c.length;
  for (const chunk of chunks) {
    queue.push(chunk);
    fed += chunk.length;
    const r = hs.receive(queue);
    out.push(...r.output);
    if (r.outcome) {
      outcome = r.outcome;
      break;
    }
  }
  const remaining = queue.length + (total - fed);
  if (outcome) {
    // Once finished, the machine is inert: it neither answers nor consumes.
    const before = queue.length;
    const again = hs.receive(queue);
    assert.deepEqual(again, { output: [] });
    assert.equal(queue.length, before);
  }
  return { output: Buffer.concat(out), outcome, consumed: total - remaining };
}

/** Groups replies per option: zero or more informational replies, then one ACK or error. */
function takeGroup(replies: OptionReply[], at: number, opt: number): { group: OptionReply[]; next: number } {
  const group: OptionReply[] = [];
  let i = at;
  for (;;) {
    const r = replies[i];
    assert.ok(r !== undefined, `option ${opt} got no final reply (ACK or error)`);
    assert.equal(r.option, opt, `reply echoes option ${r.option}, expected ${opt}`);
    group.push(r);
    i++;
    if (r.type === P.REP_ACK || isErrorReply(r.type)) return { group, next: i };
    assert.ok(
      [P.REP_SERVER, P.REP_INFO, P.REP_META_CONTEXT].includes(r.type),
      `unexpected reply type ${r.type} for option ${opt}`,
    );
  }
}

/** Checks a reply's payload is consistent with its type. */
function checkReplyData(r: OptionReply): void {
  if (isErrorReply(r.type)) {
    assert.ok(r.data.length <= P.STRING_BYTES_MAX, 'error message longer than a protocol string');
    return;
  }
  switch (r.type) {
    case P.REP_ACK:
      assert.equal(r.data.length, 0, 'ACK carries data');
      break;
    case P.REP_SERVER:
      assert.ok(r.data.length >= 4);
      assert.equal(r.data.readUInt32BE(0), r.data.length - 4, 'REP_SERVER name length inconsistent');
      break;
    case P.REP_INFO: {
      assert.ok(r.data.length >= 2);
      const info = r.data.readUInt16BE(0);
      if (info === P.INFO_EXPORT) {
        assert.equal(r.data.length, 12);
        assert.equal(Number(r.data.readBigUInt64BE(2)), EXPORT.size);
        assert.equal(r.data.readUInt16BE(10), EXPORT.flags);
      } else if (info === P.INFO_BLOCK_SIZE) {
        assert.equal(r.data.length, 14);
        assert.deepEqual(
          [r.data.readUInt32BE(2), r.data.readUInt32BE(6), r.data.readUInt32BE(10)],
          [P.BLOCK_SIZE_MIN, P.BLOCK_SIZE_PREFERRED, P.PAYLOAD_BYTES_MAX],
        );
      } else {
        assert.ok(info === P.INFO_NAME || info === P.INFO_DESCRIPTION, `unexpected info ${info}`);
      }
      break;
    }
    case P.REP_META_CONTEXT:
      assert.ok(r.data.length > 4);
      assert.equal(r.data.subarray(4).toString(), P.BASE_ALLOCATION);
      break;
  }
}

/**
 * Checks a run against the independent framing of the input: every consumed option got exactly one
 * well-formed group of replies echoing it, the outcome matches what ended the negotiation, and the
 * handshake consumed exactly up to the message that ended it.
 */
function checkAgainstFraming(input: Buffer, run: Run, shuttingDown = false): void {
  const { output, outcome, consumed } = run;
  // Bounded amplification: no input makes the server send much more than it received.
  assert.ok(output.length <= 20 * consumed + 512, `${output.length} bytes out for ${consumed} in`);
  const framing = splitNegotiation(input);
  if (framing.flags === undefined) {
    assert.equal(outcome, undefined);
    assert.equal(output.length, 0);
    assert.equal(consumed, 0);
    return;
  }
  if ((framing.flags & ~P.CLIENT_FLAGS_KNOWN) !== 0) {
    assert.deepEqual(
      outcome && { kind: outcome.kind, clientError: 'clientError' in outcome && outcome.clientError },
      {
        kind: 'close',
        clientError: true,
      },
    );
    assert.equal(output.length, 0);
    assert.equal(consumed, 4);
    return;
  }
  const noZeroes = (framing.flags & P.CLIENT_FLAG_NO_ZEROES) !== 0;
  const { replies, rest } = parseOptionReplies(output, false);
  for (const r of replies) checkReplyData(r);
  let at = 0; // index in replies
  let offset = 4; // bytes of input accounted for
  for (const sent of framing.options) {
    offset += P.OPTION_HEADER_BYTES + sent.data.length;
    if (shuttingDown && sent.option !== P.OPT_ABORT) {
      const { group, next } = takeGroup(replies, at, sent.option);
      assert.deepEqual(
        group.map((r) => r.type),
        [P.REP_ERR_SHUTDOWN],
      );
      assert.equal(next, replies.length);
      assert.equal(rest.length, 0);
      assert.equal(outcome?.kind, 'close');
      assert.equal(consumed, offset);
      return;
    }
    if (sent.option === P.OPT_EXPORT_NAME) {
      assert.equal(at, replies.length, 'replies after EXPORT_NAME');
      assert.equal(consumed, offset);
      const name = sent.data.toString('utf8');
      if (name === '' || name === EXPORT.name) {
        assert.equal(outcome?.kind, 'transmission');
        assert.equal(rest.length, noZeroes ? 10 : 134);
        assert.equal(Number(rest.readBigUInt64BE(0)), EXPORT.size);
        assert.equal(rest.readUInt16BE(8), EXPORT.flags);
        assert.ok(rest.subarray(10).every((b) => b === 0));
      } else {
        assert.deepEqual(outcome && { kind: outcome.kind }, { kind: 'close' });
        assert.equal(rest.length, 0);
      }
      return;
    }
    const { group, next } = takeGroup(replies, at, sent.option);
    at = next;
    const last = group[group.length - 1];
    if (sent.option === P.OPT_ABORT) {
      assert.deepEqual(
        group.map((r) => r.type),
        [P.REP_ACK],
      );
      assert.deepEqual(outcome, {
        kind: 'close',
        reason: 'client aborted the negotiation',
        clientError: false,
      });
      assert.equal(at, replies.length);
      assert.equal(consumed, offset);
      return;
    }
    if (sent.option === P.OPT_GO && last.type === P.REP_ACK) {
      assert.equal(outcome?.kind, 'transmission', 'GO acknowledged but no transmission phase');
      assert.ok(group.some((r) => r.type === P.REP_INFO && r.data.readUInt16BE(0) === P.INFO_EXPORT));
      assert.equal(at, replies.length);
      assert.equal(rest.length, 0);
      assert.equal(consumed, offset, 'bytes after GO must stay queued for the transmission phase');
      return;
    }
    if (
      ![P.OPT_LIST, P.OPT_INFO, P.OPT_GO, P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT].includes(
        sent.option,
      )
    ) {
      if (sent.option === P.OPT_STRUCTURED_REPLY) {
        assert.ok(last.type === P.REP_ACK || last.type === P.REP_ERR_INVALID);
      } else if (sent.option === P.OPT_STARTTLS) {
        // NOTLS mode (no --nbd-tls): the spec's answer for "not by policy".
        assert.deepEqual(
          group.map((r) => r.type),
          [P.REP_ERR_POLICY],
        );
      } else {
        assert.deepEqual(
          group.map((r) => r.type),
          [P.REP_ERR_UNSUP],
        );
      }
    }
  }
  // No option ended the negotiation.
  assert.equal(at, replies.length, 'replies without a matching option');
  assert.equal(rest.length, 0, 'trailing bytes that are not an option reply');
  if (framing.stop === 'bad-magic' || framing.stop === 'too-long') {
    assert.equal(outcome?.kind, 'close');
    assert.ok(outcome?.kind === 'close' && outcome.clientError);
    assert.equal(consumed, framing.end + P.OPTION_HEADER_BYTES);
  } else {
    assert.equal(outcome, undefined);
    // Waiting for the rest of an option: its header may be held, never its partial data.
    assert.ok(consumed === framing.end || consumed === framing.end + P.OPTION_HEADER_BYTES);
  }
}

function sameRun(a: Run, b: Run): void {
  assert.deepEqual(b.output, a.output, 'output depends on chunk boundaries');
  assert.deepEqual(b.outcome, a.outcome, 'outcome depends on chunk boundaries');
  assert.equal(b.consumed, a.consumed, 'consumed bytes depend on chunk boundaries');
}

// ---------------------------------------------------------------------------------------------
// A generator of well-formed negotiations, with the replies a correct server gives.

type Step =
  | { t: 'list' }
  | { t: 'info'; name: string; infos: number[] }
  | { t: 'sr' }
  | { t: 'meta'; set: boolean; name: string; queries: string[] }
  | { t: 'unsupported'; opt: number };

type Final =
  | { t: 'go'; name: string; infos: number[] }
  | { t: 'export_name'; name: string }
  | { t: 'abort' }
  | { t: 'none' };

const arbName = fc.constantFrom('', 'volrep', 'other', 'volrep2', 'Volrep');
const arbInfos = fc.array(fc.oneof(fc.constantFrom(0, 1, 2, 3), fc.nat({ max: 0xffff })), { maxLength: 5 });
const arbQueries = fc.array(
  fc.constantFrom('base:allocation', 'base:', 'qemu:dirty-bitmap:x', 'other:thing', '', 'base:allocation2'),
  { maxLength: 4 },
);

const arbStep: fc.Arbitrary<Step> = fc.oneof(
  fc.constant({ t: 'list' as const }),
  fc.record({ t: fc.constant('info' as const), name: arbName, infos: arbInfos }),
  fc.constant({ t: 'sr' as const }),
  fc.record({ t: fc.constant('meta' as const), set: fc.boolean(), name: arbName, queries: arbQueries }),
  fc.record({
    t: fc.constant('unsupported' as const),
    opt: fc.constantFrom(P.OPT_STARTTLS, 4, 11, 12, 13, 0, 0xffff, 0x80000000),
  }),
);

const arbFinal: fc.Arbitrary<Final> = fc.oneof(
  fc.record({ t: fc.constant('go' as const), name: fc.constantFrom('', 'volrep'), infos: arbInfos }),
  fc.record({ t: fc.constant('export_name' as const), name: fc.constantFrom('', 'volrep') }),
  fc.constant({ t: 'abort' as const }),
  fc.constant({ t: 'none' as const }),
);

const arbNegotiation = fc.record({
  flags: fc.constantFrom(
    0,
    P.CLIENT_FLAG_FIXED_NEWSTYLE,
    P.CLIENT_FLAG_FIXED_NEWSTYLE | P.CLIENT_FLAG_NO_ZEROES,
  ),
  steps: fc.array(arbStep, { maxLength: 8 }),
  final: arbFinal,
  /** Requests sent right behind the final option, as pipelining clients do. */
  trailing: fc.uint8Array({ maxLength: 64 }),
});

type Negotiation = { flags: number; steps: Step[]; final: Final; trailing: Uint8Array };

function encodeNegotiation(n: Negotiation): Buffer {
  const parts = [clientFlags(n.flags)];
  for (const s of n.steps) {
    if (s.t === 'list') parts.push(option(P.OPT_LIST));
    else if (s.t === 'info') parts.push(option(P.OPT_INFO, infoData(s.name, s.infos)));
    else if (s.t === 'sr') parts.push(option(P.OPT_STRUCTURED_REPLY));
    else if (s.t === 'meta') {
      parts.push(
        option(s.set ? P.OPT_SET_META_CONTEXT : P.OPT_LIST_META_CONTEXT, metaData(s.name, s.queries)),
      );
    } else parts.push(option(s.opt, Buffer.from('xyz')));
  }
  const f = n.final;
  if (f.t === 'go') parts.push(option(P.OPT_GO, infoData(f.name, f.infos)));
  else if (f.t === 'export_name') parts.push(option(P.OPT_EXPORT_NAME, Buffer.from(f.name)));
  else if (f.t === 'abort') parts.push(option(P.OPT_ABORT));
  if (f.t !== 'none' && f.t !== 'abort') {
    parts.push(
      requestHeader({ flags: 0, command: P.CMD_READ, handle: 7n, offset: 0n, length: 512 }),
      Buffer.from(n.trailing),
    );
  }
  return Buffer.concat(parts);
}

interface Expected {
  groups: { option: number; types: number[]; data?: Buffer[] }[];
  outcome: HandshakeOutcome | undefined;
}

function infoReplies(infos: number[]): { types: number[]; data: Buffer[] } {
  const exportInfo = Buffer.concat([
    u16(P.INFO_EXPORT),
    Buffer.from(BigInt(EXPORT.size).toString(16).padStart(16, '0'), 'hex'),
    u16(EXPORT.flags),
  ]);
  const data = [exportInfo];
  if (infos.includes(P.INFO_NAME)) data.push(Buffer.concat([u16(P.INFO_NAME), Buffer.from(EXPORT.name)]));
  if (infos.includes(P.INFO_DESCRIPTION)) {
    data.push(Buffer.concat([u16(P.INFO_DESCRIPTION), Buffer.from(EXPORT.description)]));
  }
  data.push(Buffer.concat([u16(P.INFO_BLOCK_SIZE), u32(1), u32(4096), u32(32 * 1024 * 1024)]));
  data.push(Buffer.alloc(0));
  return { types: [...data.slice(0, -1).map(() => P.REP_INFO), P.REP_ACK], data };
}

function expectedReplies(n: Negotiation): Expected {
  const groups: Expected['groups'] = [];
  const nameOk = (name: string) => name === '' || name === EXPORT.name;
  let sr = false;
  let baseId = 0;
  for (const s of n.steps) {
    if (s.t === 'list') {
      groups.push({
        option: P.OPT_LIST,
        types: [P.REP_SERVER, P.REP_ACK],
        data: [Buffer.concat([u32(EXPORT.name.length), Buffer.from(EXPORT.name)]), Buffer.alloc(0)],
      });
    } else if (s.t === 'info') {
      groups.push(
        nameOk(s.name)
          ? { option: P.OPT_INFO, ...infoReplies(s.infos) }
          : { option: P.OPT_INFO, types: [P.REP_ERR_UNKNOWN] },
      );
    } else if (s.t === 'sr') {
      groups.push({ option: P.OPT_STRUCTURED_REPLY, types: [sr ? P.REP_ERR_INVALID : P.REP_ACK] });
      sr = true;
    } else if (s.t === 'meta') {
      const opt = s.set ? P.OPT_SET_META_CONTEXT : P.OPT_LIST_META_CONTEXT;
      if (!sr) groups.push({ option: opt, types: [P.REP_ERR_INVALID] });
      else if (!nameOk(s.name)) groups.push({ option: opt, types: [P.REP_ERR_UNKNOWN] });
      else {
        const selected =
          (!s.set && s.queries.length === 0) ||
          s.queries.some((q) => q === 'base:' || q === P.BASE_ALLOCATION);
        if (s.set) baseId = selected ? 1 : 0;
        const context = Buffer.concat([u32(s.set ? 1 : 0), Buffer.from(P.BASE_ALLOCATION)]);
        groups.push(
          selected
            ? { option: opt, types: [P.REP_META_CONTEXT, P.REP_ACK], data: [context, Buffer.alloc(0)] }
            : { option: opt, types: [P.REP_ACK] },
        );
      }
    } else {
      groups.push({ option: s.opt, types: [s.opt === P.OPT_STARTTLS ? P.REP_ERR_POLICY : P.REP_ERR_UNSUP] });
    }
  }
  const f = n.final;
  const session = { structuredReplies: sr, baseAllocationId: baseId };
  if (f.t === 'go') {
    groups.push({ option: P.OPT_GO, ...infoReplies(f.infos) });
    return { groups, outcome: { kind: 'transmission', session } };
  }
  if (f.t === 'export_name') return { groups, outcome: { kind: 'transmission', session } };
  if (f.t === 'abort') {
    groups.push({ option: P.OPT_ABORT, types: [P.REP_ACK] });
    return {
      groups,
      outcome: { kind: 'close', reason: 'client aborted the negotiation', clientError: false },
    };
  }
  return { groups, outcome: undefined };
}

describe('Handshake under well-formed negotiations', () => {
  it('answers every GO/INFO/LIST/LIST_META_CONTEXT/SET_META_CONTEXT/STRUCTURED_REPLY sequence correctly', () => {
    fc.assert(
      fc.property(arbNegotiation, arbCuts, (n, cuts) => {
        const input = encodeNegotiation(n);
        const run = drive(splitAt(input, cuts));
        sameRun(drive([input]), run);
        checkAgainstFraming(input, run);
        const expected = expectedReplies(n);
        assert.deepEqual(run.outcome, expected.outcome);
        const { replies, rest } = parseOptionReplies(run.output);
        let at = 0;
        for (const g of expected.groups) {
          const got = replies.slice(at, at + g.types.length);
          at += g.types.length;
          assert.deepEqual(
            got.map((r) => [r.option, r.type]),
            g.types.map((t) => [g.option, t]),
          );
          if (g.data) {
            assert.deepEqual(
              got.map((r) => r.data.toString('hex')),
              g.data.map((d) => d.toString('hex')),
            );
          }
        }
        assert.equal(at, replies.length, 'more replies than options warrant');
        if (n.final.t === 'export_name') {
          const noZeroes = (n.flags & P.CLIENT_FLAG_NO_ZEROES) !== 0;
          assert.equal(rest.length, noZeroes ? 10 : 134);
        } else {
          assert.equal(rest.length, 0);
        }
        if (n.final.t === 'go' || n.final.t === 'export_name') {
          // The pipelined request (and whatever followed) is left for the transmission phase.
          assert.equal(run.consumed, input.length - 28 - n.trailing.length);
        }
      }),
      fcParams(600),
    );
  });

  it('refuses every option but ABORT while shutting down', () => {
    fc.assert(
      fc.property(arbNegotiation, arbCuts, (n, cuts) => {
        const input = encodeNegotiation(n);
        const run = drive(splitAt(input, cuts), true);
        checkAgainstFraming(input, run, true);
      }),
      fcParams(200),
    );
  });
});

describe('Handshake under hostile input', () => {
  const check = (input: Buffer, cuts: number[]) => {
    const whole = drive([input]);
    sameRun(whole, drive(splitAt(input, cuts)));
    if (input.length <= 600) sameRun(whole, drive(bytewise(input)));
    checkAgainstFraming(input, whole);
  };

  it('random byte streams never throw and are refused or left waiting', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 300 }), arbCuts, (bytes, cuts) =>
        check(Buffer.from(bytes), cuts),
      ),
      fcParams(500),
    );
  });

  it('valid flags followed by options with random numbers and data', () => {
    const arbOption = fc.record({
      opt: fc.oneof(fc.integer({ min: 0, max: 12 }), fc.nat({ max: 0xffffffff })),
      data: fc.uint8Array({ maxLength: 40 }),
    });
    fc.assert(
      fc.property(
        fc.constantFrom(0, 1, 2, 3),
        fc.array(arbOption, { maxLength: 8 }),
        arbCuts,
        (flags, opts, cuts) => {
          const input = Buffer.concat([
            clientFlags(flags),
            ...opts.map((o) => option(o.opt, Buffer.from(o.data))),
          ]);
          check(input, cuts);
        },
      ),
      fcParams(500),
    );
  });

  it('mutated valid negotiations (flipped, truncated, inserted, duplicated bytes, huge lengths)', () => {
    fc.assert(
      fc.property(
        arbNegotiation,
        fc.array(arbMutation, { minLength: 1, maxLength: 4 }),
        arbCuts,
        (n, mutations, cuts) => check(mutate(encodeNegotiation(n), mutations), cuts),
      ),
      fcParams(1500),
    );
  });

  it('closes on a bad option magic, unknown client flags and oversize option data', () => {
    const badMagic = Buffer.concat([clientFlags(1), option(P.OPT_LIST)]);
    badMagic[4] ^= 0xff;
    assert.deepEqual(drive([badMagic]).outcome, {
      kind: 'close',
      reason: 'bad option magic',
      clientError: true,
    });
    const badFlags = drive([clientFlags(0x80)]);
    assert.equal(badFlags.outcome?.kind, 'close');
    const huge = Buffer.concat([clientFlags(1), option(P.OPT_GO).subarray(0, 12), u32(0xffffffff)]);
    const run = drive([huge]);
    assert.equal(run.outcome?.kind, 'close');
    assert.equal(run.output.length, 0);
  });

  it('holds an oversize-but-allowed option until its data arrives, then answers it', () => {
    // 64 KiB of INFO data that does not parse: an error reply, and the next option is still served.
    const data = Buffer.alloc(P.OPTION_DATA_BYTES_MAX, 0xff);
    const input = Buffer.concat([clientFlags(1), option(P.OPT_INFO, data), option(P.OPT_LIST)]);
    const run = drive(splitAt(input, [1000, 30000, 65000]));
    const { replies } = parseOptionReplies(run.output);
    assert.deepEqual(
      replies.map((r) => [r.option, r.type]),
      [
        [P.OPT_INFO, P.REP_ERR_INVALID],
        [P.OPT_LIST, P.REP_SERVER],
        [P.OPT_LIST, P.REP_ACK],
      ],
    );
  });
});
