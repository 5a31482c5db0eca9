/**
 * The replication wire format: length-prefixed binary frames, each with a magic number, a
 * protocol version, a type and a CRC32C over header and payload. Decoding is sans-I/O (bytes in
 * through a ChunkQueue, frames out) and total: any byte sequence yields frames or one error that
 * says why, never an exception or an unbounded buffer.
 *
 * Header (20 bytes, big-endian):
 *   u32 magic 'VRPL' | u8 version | u8 type | u16 flags | u32 payload length | u32 crc32c | u32 reserved
 * The CRC covers the header with the crc field zeroed, then the payload.
 */
import { crc32c } from '@node-rs/crc32';
import { WRITE_BYTES_MAX } from '../core/engine.js';
import type { ChunkQueue } from '../io/chunk-queue.js';

export const FRAME_MAGIC = 0x5652504c; // 'VRPL'
/**
 * 2: acks carry the replica's durable consistency mark. 3: data generations in the handshake.
 * 4: `written` frames (sync mode: the replica wrote, not yet synced, every update up to an id).
 */
export const PROTOCOL_VERSION = 4;
export const FRAME_HEADER_BYTES = 20;
/** Bytes an update frame needs beyond its data (its header fields, with room to spare). */
export const FRAME_UPDATE_OVERHEAD_BYTES = 64;
/** Largest payload: the engine's largest write (one update) plus its header fields. */
export const FRAME_PAYLOAD_BYTES_MAX = WRITE_BYTES_MAX + FRAME_UPDATE_OVERHEAD_BYTES;

export const FrameType = {
  hello: 1,
  welcome: 2,
  refuse: 3,
  update: 4,
  barrier: 5,
  ack: 6,
  keepAlive: 7,
  resyncBegin: 8,
  resyncEnd: 9,
  dirtyBitmap: 10,
  written: 11,
} as const;
export type FrameTypeName = keyof typeof FrameType;
const TYPE_NAMES = new Map<number, FrameTypeName>(
  Object.entries(FrameType).map(([name, code]) => [code, name as FrameTypeName]),
);

export interface RawFrame {
  type: FrameTypeName;
  flags: number;
  /** Views of the received bytes; copy before keeping them beyond the current turn. */
  payload: Buffer[];
  payloadLength: number;
}

export type DecodeResult = { kind: 'frame'; frame: RawFrame } | { kind: 'error'; reason: string } | undefined;

export function encodeFrame(type: FrameTypeName, payload: Buffer[] = [], flags = 0): Buffer[] {
  let length = 0;
  for (const p of payload) length += p.length;
  if (length > FRAME_PAYLOAD_BYTES_MAX)
    throw new RangeError(`frame payload of ${length} bytes exceeds the limit`);
  const header = Buffer.alloc(FRAME_HEADER_BYTES);
  header.writeUInt32BE(FRAME_MAGIC, 0);
  header.writeUInt8(PROTOCOL_VERSION, 4);
  header.writeUInt8(FrameType[type], 5);
  header.writeUInt16BE(flags, 6);
  header.writeUInt32BE(length, 8);
  let crc = crc32c(header);
  for (const p of payload) crc = crc32c(p, crc);
  header.writeUInt32BE(crc >>> 0, 12);
  return [header, ...payload];
}

/** Pulls frames out of a byte stream; after an error the stream is unusable (close the connection). */
export class FrameDecoder {
  private header: Buffer | undefined;
  private failed: string | undefined;

  next(queue: ChunkQueue): DecodeResult {
    if (this.failed) return { kind: 'error', reason: this.failed };
    if (this.header === undefined) {
      if (queue.length < FRAME_HEADER_BYTES) return undefined;
      const header = Buffer.from(queue.take(FRAME_HEADER_BYTES));
      const problem = checkHeader(header);
      if (problem) return this.fail(problem);
      this.header = header;
    }
    const header = this.header;
    const length = header.readUInt32BE(8);
    if (queue.length < length) return undefined;
    this.header = undefined;
    const payload = queue.takeViews(length);
    const expected = header.readUInt32BE(12);
    header.writeUInt32BE(0, 12);
    let crc = crc32c(header);
    for (const p of payload) crc = crc32c(p, crc);
    if (crc >>> 0 !== expected) return this.fail('frame checksum mismatch');
    const type = TYPE_NAMES.get(header.readUInt8(5))!;
    return { kind: 'frame', frame: { type, flags: header.readUInt16BE(6), payload, payloadLength: length } };
  }

  private fail(reason: string): DecodeResult {
    this.failed = reason;
    return { kind: 'error', reason };
  }
}

function checkHeader(header: Buffer): string | undefined {
  if (header.readUInt32BE(0) !== FRAME_MAGIC) return 'bad frame magic (not a volrep replication stream)';
  const version = header.readUInt8(4);
  if (version !== PROTOCOL_VERSION)
    return `unsupported protocol version ${version} (this side speaks ${PROTOCOL_VERSION})`;
  if (!TYPE_NAMES.has(header.readUInt8(5))) return `unknown frame type ${header.readUInt8(5)}`;
  if (header.readUInt32BE(8) > FRAME_PAYLOAD_BYTES_MAX)
    return `frame payload of ${header.readUInt32BE(8)} bytes exceeds the limit`;
  if (header.readUInt32BE(16) !== 0) return 'reserved header field is not zero';
  return undefined;
}

/** Copies a frame's payload views into one buffer. */
export function payloadBytes(frame: RawFrame): Buffer {
  return frame.payload.length === 1 ? frame.payload[0] : Buffer.concat(frame.payload, frame.payloadLength);
}
