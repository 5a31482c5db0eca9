/**
 * Test helpers for the NBD fuzz tests: encoders for client messages, stream splitting and
 * mutation, an independent reference model of request framing and validation, and a parser of
 * option replies. Nothing here imports the code under test except the protocol constants.
 */
import fc from 'fast-check';
import * as P from '../../src/nbd/protocol.js';

/** fast-check parameters: `VOLREP_SEED` replays a reported failure. */
export function fcParams(numRuns: number): { seed?: number; numRuns: number; includeErrorInReport: boolean } {
  const seed = process.env.VOLREP_SEED ? Number(process.env.VOLREP_SEED) : undefined;
  return { seed, numRuns, includeErrorInReport: true };
}

// ---------------------------------------------------------------------------------------------
// Encoders

export function u16(n: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(n, 0);
  return b;
}

export function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0, 0);
  return b;
}

export function clientFlags(flags: number): Buffer {
  return u32(flags);
}

export function option(opt: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const header = Buffer.alloc(P.OPTION_HEADER_BYTES);
  header.writeBigUInt64BE(P.IHAVEOPT, 0);
  header.writeUInt32BE(opt >>> 0, 8);
  header.writeUInt32BE(data.length, 12);
  return Buffer.concat([header, data]);
}

/** Data of NBD_OPT_INFO / NBD_OPT_GO. */
export function infoData(name: string, infos: number[]): Buffer {
  const n = Buffer.from(name);
  return Buffer.concat([u32(n.length), n, u16(infos.length), ...infos.map(u16)]);
}

/** Data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT. */
export function metaData(name: string, queries: string[]): Buffer {
  const n = Buffer.from(name);
  const parts = [u32(n.length), n, u32(queries.length)];
  for (const q of queries) {
    const qb = Buffer.from(q);
    parts.push(u32(qb.length), qb);
  }
  return Buffer.concat(parts);
}

export interface RequestFields {
  flags: number;
  command: number;
  handle: bigint;
  offset: bigint;
  length: number;
}

export function requestHeader(r: RequestFields): Buffer {
  const b = Buffer.alloc(P.REQUEST_HEADER_BYTES);
  b.writeUInt32BE(P.REQUEST_MAGIC, 0);
  b.writeUInt16BE(r.flags, 4);
  b.writeUInt16BE(r.command, 6);
  b.writeBigUInt64BE(r.handle, 8);
  b.writeBigUInt64BE(r.offset, 16);
  b.writeUInt32BE(r.length >>> 0, 24);
  return b;
}

// ---------------------------------------------------------------------------------------------
// Splitting and mutation

/** Splits `buf` at the given cut points (any values; reduced modulo length+1, sorted). */
export function splitAt(buf: Buffer, cuts: number[]): Buffer[] {
  const points = [...new Set(cuts.map((c) => c % (buf.length + 1)))].sort((a, b) => a - b);
  const out: Buffer[] = [];
  let at = 0;
  for (const p of points) {
    out.push(buf.subarray(at, p));
    at = p;
  }
  out.push(buf.subarray(at));
  return out;
}

export const arbCuts = fc.array(fc.nat(), { maxLength: 12 });

/** Every byte in its own chunk: the most hostile split. */
export function bytewise(buf: Buffer): Buffer[] {
  const out: Buffer[] = [];
  for (let i = 0; i < buf.length; i++) out.push(buf.subarray(i, i + 1));
  return out;
}

export type Mutation =
  | { kind: 'flip'; at: number; xor: number }
  | { kind: 'truncate'; at: number }
  | { kind: 'insert'; at: number; bytes: Uint8Array }
  | { kind: 'duplicate'; at: number; length: number }
  | { kind: 'delete'; at: number; length: number }
  | { kind: 'u32'; at: number; value: number }
  | { kind: 'u16'; at: number; value: number };

/** Values that make lengths, counts and offsets interesting when written over a field. */
const HUGE_U32 = [
  0xffffffff,
  0x80000000,
  0x7fffffff,
  P.OPTION_DATA_BYTES_MAX,
  P.OPTION_DATA_BYTES_MAX + 1,
  P.STRING_BYTES_MAX,
  P.STRING_BYTES_MAX + 1,
  P.PAYLOAD_BYTES_MAX,
  P.PAYLOAD_BYTES_MAX + 1,
  0x00100000,
  0,
  1,
];

export const arbMutation: fc.Arbitrary<Mutation> = fc.oneof(
  fc.record({ kind: fc.constant('flip' as const), at: fc.nat(), xor: fc.integer({ min: 1, max: 255 }) }),
  fc.record({ kind: fc.constant('truncate' as const), at: fc.nat() }),
  fc.record({
    kind: fc.constant('insert' as const),
    at: fc.nat(),
    bytes: fc.uint8Array({ minLength: 1, maxLength: 40 }),
  }),
  fc.record({
    kind: fc.constant('duplicate' as const),
    at: fc.nat(),
    length: fc.integer({ min: 1, max: 64 }),
  }),
  fc.record({ kind: fc.constant('delete' as const), at: fc.nat(), length: fc.integer({ min: 1, max: 16 }) }),
  fc.record({
    kind: fc.constant('u32' as const),
    at: fc.nat(),
    value: fc.oneof(fc.constantFrom(...HUGE_U32), fc.nat({ max: 0xffffffff })),
  }),
  fc.record({ kind: fc.constant('u16' as const), at: fc.nat(), value: fc.nat({ max: 0xffff }) }),
);

export function mutate(input: Buffer, mutations: Mutation[]): Buffer {
  let buf = Buffer.from(input);
  for (const m of mutations) {
    const at = buf.length === 0 ? 0 : m.at % (buf.length + 1);
    switch (m.kind) {
      case 'flip':
        if (at < buf.length) buf[at] ^= m.xor;
        break;
      case 'truncate':
        buf = buf.subarray(0, at);
        break;
      case 'insert':
        buf = Buffer.concat([buf.subarray(0, at), Buffer.from(m.bytes), buf.subarray(at)]);
        break;
      case 'duplicate':
        buf = Buffer.concat([buf.subarray(0, at + m.length), buf.subarray(at)]);
        break;
      case 'delete':
        buf = Buffer.concat([buf.subarray(0, at), buf.subarray(at + m.length)]);
        break;
      case 'u32':
        if (at + 4 <= buf.length) buf.writeUInt32BE(m.value >>> 0, at);
        break;
      case 'u16':
        if (at + 2 <= buf.length) buf.writeUInt16BE(m.value, at);
        break;
    }
  }
  return buf;
}

// ---------------------------------------------------------------------------------------------
// Reference model of the transmission phase (framing + validation), written from the protocol
// description and volrep's README, independently of src/nbd/requests.ts.

export interface Limits {
  size: number;
  readOnly: boolean;
  structuredReplies: boolean;
  baseAllocationId: number;
}

export interface RefRequest {
  command: number;
  flags: number;
  handle: Buffer;
  /** Exact 64-bit offset as sent. */
  offset: bigint;
  length: number;
  /** WRITE payload when it is accepted (a copy of the stream bytes). */
  payload?: Buffer;
  /** 0 when the request may run, else the NBD errno the reply must carry. */
  error: number;
}

export interface RefParse {
  requests: RefRequest[];
  fatal: boolean;
  /** Bytes a parser should still hold after consuming everything it can. */
  remaining: number;
}

const WRITE_COMMANDS = new Set([P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES]);

/** Flags each command may carry (FUA on anything, as the protocol allows). */
export const REF_ALLOWED_FLAGS: Record<number, number> = {
  [P.CMD_READ]: P.CMD_FLAG_FUA | P.CMD_FLAG_DF,
  [P.CMD_WRITE]: P.CMD_FLAG_FUA,
  [P.CMD_DISC]: P.CMD_FLAG_FUA,
  [P.CMD_FLUSH]: P.CMD_FLAG_FUA,
  [P.CMD_TRIM]: P.CMD_FLAG_FUA,
  [P.CMD_WRITE_ZEROES]: P.CMD_FLAG_FUA | P.CMD_FLAG_NO_HOLE,
  [P.CMD_BLOCK_STATUS]: P.CMD_FLAG_FUA | P.CMD_FLAG_REQ_ONE,
};

export function isWriteCommand(command: number): boolean {
  return WRITE_COMMANDS.has(command);
}

export function refError(
  command: number,
  flags: number,
  offset: bigint,
  length: number,
  limits: Limits,
): number {
  const allowed = REF_ALLOWED_FLAGS[command];
  if (allowed === undefined) return P.EINVAL;
  if ((flags & ~allowed) !== 0) return P.EINVAL;
  if (command === P.CMD_DISC || command === P.CMD_FLUSH) return 0;
  if (isWriteCommand(command) && limits.readOnly) return P.EPERM;
  if (command === P.CMD_BLOCK_STATUS && (!limits.structuredReplies || limits.baseAllocationId === 0)) {
    return P.EINVAL;
  }
  if (length === 0) return P.EINVAL;
  if ((command === P.CMD_READ || command === P.CMD_WRITE) && length > P.PAYLOAD_BYTES_MAX) return P.EINVAL;
  if (offset + BigInt(length) > BigInt(limits.size)) return isWriteCommand(command) ? P.ENOSPC : P.EINVAL;
  return 0;
}

export function refParse(bytes: Buffer, limits: Limits): RefParse {
  const requests: RefRequest[] = [];
  let at = 0;
  for (;;) {
    if (bytes.length - at < P.REQUEST_HEADER_BYTES)
      return { requests, fatal: false, remaining: bytes.length - at };
    if (bytes.readUInt32BE(at) !== P.REQUEST_MAGIC) {
      return { requests, fatal: true, remaining: bytes.length - at - P.REQUEST_HEADER_BYTES };
    }
    const flags = bytes.readUInt16BE(at + 4);
    const command = bytes.readUInt16BE(at + 6);
    const handle = Buffer.from(bytes.subarray(at + 8, at + 16));
    const offset = bytes.readBigUInt64BE(at + 16);
    const length = bytes.readUInt32BE(at + 24);
    at += P.REQUEST_HEADER_BYTES;
    const error = refError(command, flags, offset, length, limits);
    const req: RefRequest = { command, flags, handle, offset, length, error };
    if (command === P.CMD_WRITE) {
      if (bytes.length - at < length) {
        // An oversize payload is dropped as it arrives; a normal one waits in the queue.
        const remaining = length > P.PAYLOAD_BYTES_MAX ? 0 : bytes.length - at;
        return { requests, fatal: false, remaining };
      }
      if (error === 0) req.payload = Buffer.from(bytes.subarray(at, at + length));
      at += length;
    }
    requests.push(req);
  }
}

// ---------------------------------------------------------------------------------------------
// Option replies

export interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

/**
 * Parses a sequence of option replies; throws (failing the test) on a bad magic or a length that
 * runs past the end. Returns the replies and whatever bytes follow the last complete one.
 */
export function parseOptionReplies(
  buf: Buffer,
  stopAfterGoAck = true,
): { replies: OptionReply[]; rest: Buffer } {
  const replies: OptionReply[] = [];
  let at = 0;
  while (buf.length - at >= 20) {
    if (buf.readBigUInt64BE(at) !== P.OPTION_REPLY_MAGIC) break;
    const option = buf.readUInt32BE(at + 8);
    const type = buf.readUInt32BE(at + 12);
    const length = buf.readUInt32BE(at + 16);
    if (at + 20 + length > buf.length) throw new Error(`option reply length ${length} runs past the output`);
    replies.push({ option, type, data: Buffer.from(buf.subarray(at + 20, at + 20 + length)) });
    at += 20 + length;
    if (stopAfterGoAck && option === P.OPT_GO && type === P.REP_ACK) break;
  }
  return { replies, rest: buf.subarray(at) };
}

export function isErrorReply(type: number): boolean {
  return type >= 0x80000000;
}

/** Options as a client sent them: the parse of the negotiation bytes that were consumed. */
export interface SentOption {
  option: number;
  data: Buffer;
}

/**
 * Splits negotiation bytes into client flags and options, stopping at a bad magic or a length over
 * the limit (what a server must refuse). `complete` is false when the bytes end mid-message.
 */
export function splitNegotiation(bytes: Buffer): {
  flags?: number;
  options: SentOption[];
  stop?: 'bad-magic' | 'too-long' | 'incomplete';
  /** Offset just after the last complete option. */
  end: number;
} {
  if (bytes.length < 4) return { options: [], stop: 'incomplete', end: 0 };
  const flags = bytes.readUInt32BE(0);
  const options: SentOption[] = [];
  let at = 4;
  for (;;) {
    if (at === bytes.length) return { flags, options, end: at };
    if (bytes.length - at < P.OPTION_HEADER_BYTES) return { flags, options, stop: 'incomplete', end: at };
    if (bytes.readBigUInt64BE(at) !== P.IHAVEOPT) return { flags, options, stop: 'bad-magic', end: at };
    const opt = bytes.readUInt32BE(at + 8);
    const length = bytes.readUInt32BE(at + 12);
    if (length > P.OPTION_DATA_BYTES_MAX) return { flags, options, stop: 'too-long', end: at };
    if (bytes.length - at - P.OPTION_HEADER_BYTES < length)
      return { flags, options, stop: 'incomplete', end: at };
    options.push({ option: opt, data: Buffer.from(bytes.subarray(at + 16, at + 16 + length)) });
    at += P.OPTION_HEADER_BYTES + length;
  }
}
