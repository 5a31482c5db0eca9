/**
 * The replication messages carried in frames, with total decoders: a payload that does not have
 * exactly the expected shape is a protocol error with a reason, never an exception.
 */
import assert from 'node:assert/strict';
import {
  encodeFrame,
  FRAME_UPDATE_OVERHEAD_BYTES,
  type FrameTypeName,
  payloadBytes,
  type RawFrame,
} from './frames.js';
import { type Generations, type HandshakeDecision, parseGenerations } from './generations.js';

export type UpdateKind = 'data' | 'zero' | 'trim';
const KIND_CODES: Record<UpdateKind, number> = { data: 0, zero: 1, trim: 2 };
const KINDS: UpdateKind[] = ['data', 'zero', 'trim'];

/** Frame flag on an update: it carries resync content rather than a client write. */
export const UPDATE_FLAG_RESYNC = 1;

export interface Hello {
  volumeId: string;
  size: number;
  regionSize: number;
  role: 'primary';
  /** The sender's generations, as of this hello (DESIGN.md §7). */
  generations: Generations;
  /** Sync mode: the primary wants `written` frames (its writes complete once the replica wrote them). */
  syncMode?: boolean;
  /** The primary's in-flight window in bytes: it waits on acks once that much is unacked. */
  windowBytes?: number;
}

export interface Welcome {
  volumeId: string;
  size: number;
  regionSize: number;
  role: 'secondary';
  /** Highest update id whose data is durable on the replica (H14). */
  lastAppliedUpdate: number;
  consistent: boolean;
  generations: Generations;
  /** Regions the replica itself may hold differently (a demoted primary's unacked writes); sent before the welcome as dirtyBitmap frames. */
  dirtyRegions: number;
  /** The replica was created empty by `volrep create` and has received nothing since: all zeros. */
  bornZero?: true;
}

/** Why a handshake was refused, and (when generations decided it) the refusing side's view. */
export interface Refusal {
  reason: string;
  decision?: HandshakeDecision;
  role?: 'primary' | 'secondary';
  generations?: Generations;
}

/** A piece of the replica's own dirty bitmap: `bits` start at byte `byteOffset` of it. */
export interface DirtyBitmapPiece {
  byteOffset: number;
  bits: Buffer;
}

/** The replica's durable state, sent whenever it changes: every id ≤ `id` is durable there. */
export interface Ack {
  id: number;
  /** The replica's durable consistency mark (false from a resync's begin until its end is durable). */
  consistent: boolean;
}

export interface UpdateHeader {
  id: number;
  offset: number;
  length: number;
  kind: UpdateKind;
  resync: boolean;
}

export type Message =
  | { type: 'hello'; hello: Hello }
  | { type: 'welcome'; welcome: Welcome }
  | { type: 'refuse'; refusal: Refusal }
  | { type: 'dirtyBitmap'; piece: DirtyBitmapPiece }
  | { type: 'update'; update: UpdateHeader; data: Buffer[] }
  | { type: 'barrier'; id: number }
  | { type: 'ack'; ack: Ack }
  /** Every update ≤ id is written to the replica (not necessarily durable yet). */
  | { type: 'written'; id: number }
  | { type: 'keepAlive' }
  | { type: 'resyncBegin'; id: number }
  | { type: 'resyncEnd'; id: number };

export const UPDATE_HEADER_BYTES = 21;
assert.ok(UPDATE_HEADER_BYTES <= FRAME_UPDATE_OVERHEAD_BYTES);
const ACK_BYTES = 9;
const ACK_FLAG_CONSISTENT = 1;
/** JSON handshake payloads are a few hundred bytes. */
const JSON_PAYLOAD_BYTES_MAX = 4096;

export function encodeUpdateHeader(u: UpdateHeader): Buffer {
  const b = Buffer.alloc(UPDATE_HEADER_BYTES);
  writeU64(b, 0, u.id);
  writeU64(b, 8, u.offset);
  b.writeUInt32BE(u.length, 16);
  b.writeUInt8(KIND_CODES[u.kind], 20);
  return b;
}

export function encodeId(id: number): Buffer {
  const b = Buffer.alloc(8);
  writeU64(b, 0, id);
  return b;
}

export function encodeAck(ack: Ack): Buffer {
  const b = Buffer.alloc(ACK_BYTES);
  writeU64(b, 0, ack.id);
  b.writeUInt8(ack.consistent ? ACK_FLAG_CONSISTENT : 0, 8);
  return b;
}

export function encodeDirtyBitmap(piece: DirtyBitmapPiece): Buffer[] {
  const head = Buffer.alloc(8);
  writeU64(head, 0, piece.byteOffset);
  return [head, piece.bits];
}

/** Bytes of the dirty bitmap per frame. */
export const DIRTY_BITMAP_PIECE_BYTES = 64 * 1024;

const DECISIONS: readonly HandshakeDecision[] = [
  'fullSync',
  'resync',
  'peerNewer',
  'splitBrain',
  'fullOnRequest',
  'unrelated',
];

export function encodeJson(value: object): Buffer {
  return Buffer.from(JSON.stringify(value));
}

/** A whole refuse frame: what a listener says to a peer before any session has begun. */
export function encodeRefusalFrame(reason: string): Buffer[] {
  return encodeFrame('refuse', [encodeJson({ reason } satisfies Refusal)]);
}

export function decodeMessage(frame: RawFrame): Message | { type: 'invalid'; reason: string } {
  const invalid = (reason: string) => ({ type: 'invalid' as const, reason: `${frame.type}: ${reason}` });
  switch (frame.type) {
    case 'hello': {
      const v = parseJson(frame);
      if (typeof v === 'string') return invalid(v);
      if (v.role !== 'primary') return invalid("role is not 'primary'");
      const common = commonFields(v);
      if (typeof common === 'string') return invalid(common);
      const generations = parseGenerations(v.generations);
      if (generations === undefined || generations.current === null) return invalid('bad generations');
      if (v.syncMode !== undefined && typeof v.syncMode !== 'boolean')
        return invalid('syncMode is not a boolean');
      const windowBytes = v.windowBytes;
      if (windowBytes !== undefined && !(Number.isSafeInteger(windowBytes) && (windowBytes as number) > 0))
        return invalid('windowBytes is not a positive integer');
      return {
        type: 'hello',
        hello: {
          ...common,
          role: 'primary',
          generations,
          ...(v.syncMode === true && { syncMode: true }),
          ...(windowBytes !== undefined && { windowBytes: windowBytes as number }),
        },
      };
    }
    case 'welcome': {
      const v = parseJson(frame);
      if (typeof v === 'string') return invalid(v);
      if (v.role !== 'secondary') return invalid("role is not 'secondary'");
      const common = commonFields(v);
      if (typeof common === 'string') return invalid(common);
      if (!isCount(v.lastAppliedUpdate)) return invalid('lastAppliedUpdate is not a count');
      if (typeof v.consistent !== 'boolean') return invalid('consistent is not a boolean');
      const generations = parseGenerations(v.generations);
      if (generations === undefined) return invalid('bad generations');
      if (!isCount(v.dirtyRegions)) return invalid('dirtyRegions is not a count');
      if (v.bornZero !== undefined && v.bornZero !== true) return invalid('bornZero is not true');
      return {
        type: 'welcome',
        welcome: {
          ...common,
          role: 'secondary',
          lastAppliedUpdate: v.lastAppliedUpdate,
          consistent: v.consistent,
          generations,
          dirtyRegions: v.dirtyRegions,
          ...(v.bornZero === true && { bornZero: true }),
        },
      };
    }
    case 'refuse': {
      const v = parseJson(frame);
      if (typeof v === 'string') return invalid(v);
      if (typeof v.reason !== 'string') return invalid('reason is not a string');
      const refusal: Refusal = { reason: v.reason };
      if (v.decision !== undefined) {
        if (!DECISIONS.includes(v.decision as HandshakeDecision)) return invalid('unknown decision');
        refusal.decision = v.decision as HandshakeDecision;
      }
      if (v.role !== undefined) {
        if (v.role !== 'primary' && v.role !== 'secondary') return invalid('unknown role');
        refusal.role = v.role;
      }
      if (v.generations !== undefined) {
        const generations = parseGenerations(v.generations);
        if (generations === undefined) return invalid('bad generations');
        refusal.generations = generations;
      }
      return { type: 'refuse', refusal };
    }
    case 'dirtyBitmap': {
      if (frame.payloadLength <= 8 || frame.payloadLength > 8 + DIRTY_BITMAP_PIECE_BYTES)
        return invalid('bad length');
      const b = payloadBytes(frame);
      const byteOffset = readU64(b, 0);
      if (byteOffset === undefined) return invalid('offset out of range');
      return { type: 'dirtyBitmap', piece: { byteOffset, bits: Buffer.from(b.subarray(8)) } };
    }
    case 'update': {
      if (frame.payloadLength < UPDATE_HEADER_BYTES) return invalid('too short');
      const head = firstBytes(frame, UPDATE_HEADER_BYTES);
      const id = readU64(head, 0);
      const offset = readU64(head, 8);
      const length = head.readUInt32BE(16);
      const kind = KINDS[head.readUInt8(20)];
      if (id === undefined || offset === undefined) return invalid('id or offset out of range');
      if (kind === undefined) return invalid(`unknown kind ${head.readUInt8(20)}`);
      const dataBytes = frame.payloadLength - UPDATE_HEADER_BYTES;
      if (kind === 'data' ? dataBytes !== length : dataBytes !== 0)
        return invalid('length does not match the payload');
      if (length === 0) return invalid('empty update');
      const data = kind === 'data' ? dropViews(frame.payload, UPDATE_HEADER_BYTES) : [];
      return {
        type: 'update',
        update: { id, offset, length, kind, resync: (frame.flags & UPDATE_FLAG_RESYNC) !== 0 },
        data,
      };
    }
    case 'ack': {
      if (frame.payloadLength !== ACK_BYTES) return invalid(`expected ${ACK_BYTES} bytes`);
      const b = payloadBytes(frame);
      const id = readU64(b, 0);
      const flags = b.readUInt8(8);
      if (id === undefined) return invalid('id out of range');
      if ((flags & ~ACK_FLAG_CONSISTENT) !== 0) return invalid(`unknown flags ${flags}`);
      return { type: 'ack', ack: { id, consistent: (flags & ACK_FLAG_CONSISTENT) !== 0 } };
    }
    case 'barrier':
    case 'written':
    case 'resyncBegin':
    case 'resyncEnd': {
      if (frame.payloadLength !== 8) return invalid('expected an 8-byte id');
      const id = readU64(payloadBytes(frame), 0);
      if (id === undefined) return invalid('id out of range');
      return { type: frame.type, id };
    }
    case 'keepAlive':
      if (frame.payloadLength !== 0) return invalid('expected no payload');
      return { type: 'keepAlive' };
  }
}

function parseJson(frame: RawFrame): Record<string, unknown> | string {
  if (frame.payloadLength > JSON_PAYLOAD_BYTES_MAX) return 'payload too large';
  try {
    const v: unknown = JSON.parse(payloadBytes(frame).toString('utf8'));
    if (typeof v !== 'object' || v === null || Array.isArray(v)) return 'not a JSON object';
    return v as Record<string, unknown>;
  } catch {
    return 'not valid JSON';
  }
}

function commonFields(
  v: Record<string, unknown>,
): { volumeId: string; size: number; regionSize: number } | string {
  if (typeof v.volumeId !== 'string' || v.volumeId.length > 64) return 'volumeId is not a string';
  if (!isCount(v.size) || v.size === 0) return 'size is not a positive integer';
  if (!isCount(v.regionSize) || v.regionSize === 0) return 'regionSize is not a positive integer';
  return { volumeId: v.volumeId, size: v.size, regionSize: v.regionSize };
}

function isCount(v: unknown): v is number {
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
}

function writeU64(b: Buffer, at: number, n: number): void {
  b.writeUInt32BE(Math.floor(n / 2 ** 32), at);
  b.writeUInt32BE(n >>> 0, at + 4);
}

/** A u64 as a number, or undefined beyond 2^53 (no id or offset of ours gets there). */
function readU64(b: Buffer, at: number): number | undefined {
  const high = b.readUInt32BE(at);
  if (high >= 2 ** 21) return undefined;
  return high * 2 ** 32 + b.readUInt32BE(at + 4);
}

function firstBytes(frame: RawFrame, n: number): Buffer {
  const first = frame.payload[0];
  if (first && first.length >= n) return first.subarray(0, n);
  return payloadBytes(frame).subarray(0, n);
}

function dropViews(views: Buffer[], n: number): Buffer[] {
  const out: Buffer[] = [];
  let skip = n;
  for (const v of views) {
    if (skip >= v.length) {
      skip -= v.length;
      continue;
    }
    out.push(skip > 0 ? v.subarray(skip) : v);
    skip = 0;
  }
  return out;
}

export type { FrameTypeName };
