/**
 * The transmission phase's request parser, with no I/O: it pulls requests out of a ChunkQueue and
 * validates each one completely before any I/O can be issued for it. A request that is well framed
 * but not acceptable (out of range, bad flags, read-only) becomes a `rejected` event carrying the
 * NBD error to reply with, and the connection carries on; only a frame that cannot be delimited
 * (bad magic) is `fatal`.
 */
import type { ChunkQueue } from '../io/chunk-queue.js';
import * as P from './protocol.js';

export interface Request {
  command: number;
  flags: number;
  /** The client's 8-byte cookie, copied (the receive chunk may be reused). */
  handle: Buffer;
  offset: number;
  length: number;
  /** WRITE payload as views of the received chunks, in order. */
  payload: Buffer[];
}

export type ParseEvent =
  | { kind: 'request'; request: Request }
  | { kind: 'rejected'; request: Request; error: number; message: string }
  | { kind: 'fatal'; reason: string };

export interface ExportLimits {
  size: number;
  readOnly: boolean;
  structuredReplies: boolean;
  baseAllocationId: number;
}

const ALLOWED_FLAGS: Record<number, number> = {
  [P.CMD_READ]: P.CMD_FLAG_FUA | P.CMD_FLAG_DF,
  [P.CMD_WRITE]: P.CMD_FLAG_FUA,
  [P.CMD_DISC]: P.CMD_FLAG_FUA,
  [P.CMD_FLUSH]: P.CMD_FLAG_FUA,
  [P.CMD_TRIM]: P.CMD_FLAG_FUA,
  [P.CMD_WRITE_ZEROES]: P.CMD_FLAG_FUA | P.CMD_FLAG_NO_HOLE,
  [P.CMD_BLOCK_STATUS]: P.CMD_FLAG_FUA | P.CMD_FLAG_REQ_ONE,
};

const WRITES = new Set([P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES]);

/** Returns the NBD error and a message for an unacceptable request, or undefined if it may run. */
export function validateRequest(
  req: Request,
  limits: ExportLimits,
): { error: number; message: string } | undefined {
  const allowed = ALLOWED_FLAGS[req.command];
  if (allowed === undefined) return { error: P.EINVAL, message: `unknown command ${req.command}` };
  if ((req.flags & ~allowed) !== 0) {
    return {
      error: P.EINVAL,
      message: `flags 0x${req.flags.toString(16)} not valid for ${P.COMMAND_NAMES[req.command]}`,
    };
  }
  if (req.command === P.CMD_DISC || req.command === P.CMD_FLUSH) return undefined;
  if (WRITES.has(req.command) && limits.readOnly) return { error: P.EPERM, message: 'export is read-only' };
  if (req.command === P.CMD_BLOCK_STATUS && (!limits.structuredReplies || limits.baseAllocationId === 0)) {
    return { error: P.EINVAL, message: 'block status needs structured replies and a metadata context' };
  }
  if (req.length === 0) return { error: P.EINVAL, message: 'zero-length request' };
  if ((req.command === P.CMD_READ || req.command === P.CMD_WRITE) && req.length > P.PAYLOAD_BYTES_MAX) {
    return { error: P.EINVAL, message: `length ${req.length} exceeds the maximum ${P.PAYLOAD_BYTES_MAX}` };
  }
  if (req.offset + req.length > limits.size) {
    // Writing past the end is "no space"; reading or querying past it is an invalid request.
    return {
      error: WRITES.has(req.command) ? P.ENOSPC : P.EINVAL,
      message: 'request extends beyond the end of the export',
    };
  }
  return undefined;
}

/** Offsets beyond this cannot be inside any export (and would lose precision as numbers). */
const OFFSET_HIGH_WORD_MAX = 2 ** 20;

export class RequestParser {
  /** Header of a WRITE whose payload is still arriving, and how much of an oversize one to drop. */
  private awaiting: Request | undefined;
  private discardLeft = 0;

  constructor(private readonly limits: ExportLimits) {}

  /** The next complete event, or undefined when more bytes are needed. */
  next(queue: ChunkQueue): ParseEvent | undefined {
    if (this.awaiting !== undefined) return this.continuePayload(queue);
    if (queue.length < P.REQUEST_HEADER_BYTES) return undefined;
    const header = queue.take(P.REQUEST_HEADER_BYTES);
    if (header.readUInt32BE(0) !== P.REQUEST_MAGIC) return { kind: 'fatal', reason: 'bad request magic' };
    const high = header.readUInt32BE(16);
    const request: Request = {
      flags: header.readUInt16BE(4),
      command: header.readUInt16BE(6),
      handle: Buffer.from(header.subarray(8, 16)),
      // An absurd offset is clamped to one that is still out of range, never wrapped into range.
      offset:
        high >= OFFSET_HIGH_WORD_MAX ? Number.MAX_SAFE_INTEGER : high * 2 ** 32 + header.readUInt32BE(20),
      length: header.readUInt32BE(24),
      payload: [],
    };
    if (request.command === P.CMD_WRITE) {
      this.awaiting = request;
      this.discardLeft = request.length > P.PAYLOAD_BYTES_MAX ? request.length : 0;
      return this.continuePayload(queue);
    }
    return this.judge(request);
  }

  private continuePayload(queue: ChunkQueue): ParseEvent | undefined {
    const request = this.awaiting!;
    if (this.discardLeft > 0) {
      // Too large to hold: drop the payload as it arrives so the stream stays in frame.
      this.discardLeft -= queue.discard(this.discardLeft);
      if (this.discardLeft > 0) return undefined;
    } else {
      if (queue.length < request.length) return undefined;
      request.payload = queue.takeViews(request.length);
    }
    this.awaiting = undefined;
    return this.judge(request);
  }

  private judge(request: Request): ParseEvent {
    const problem = validateRequest(request, this.limits);
    if (problem) return { kind: 'rejected', request, ...problem };
    return { kind: 'request', request };
  }
}
