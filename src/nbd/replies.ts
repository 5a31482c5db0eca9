/** Encoders for transmission-phase replies, simple and structured. */
import * as P from './protocol.js';

/** Bytes in front of READ data in a reply: the header, plus the offset field of an OFFSET_DATA chunk. */
export function readReplyPrefixBytes(structured: boolean): number {
  return structured ? P.STRUCTURED_REPLY_HEADER_BYTES + 8 : P.SIMPLE_REPLY_HEADER_BYTES;
}

/**
 * Writes the header of a successful READ reply into the front of `buf`, whose tail holds (or will
 * hold) the data, so header and data go out as one buffer with no copy.
 */
export function writeReadReplyPrefix(
  buf: Buffer,
  handle: Buffer,
  offset: number,
  length: number,
  structured: boolean,
): void {
  if (structured) {
    writeChunkHeader(buf, P.REPLY_FLAG_DONE, P.REPLY_TYPE_OFFSET_DATA, handle, 8 + length);
    buf.writeUInt32BE(Math.floor(offset / 2 ** 32), 20);
    buf.writeUInt32BE(offset >>> 0, 24);
  } else {
    writeSimpleHeader(buf, 0, handle);
  }
}

/** A reply with no data: success (error 0) or an error. */
export function encodeReply(handle: Buffer, error: number, structured: boolean, message = ''): Buffer {
  if (!structured) {
    const buf = Buffer.allocUnsafe(P.SIMPLE_REPLY_HEADER_BYTES);
    writeSimpleHeader(buf, error, handle);
    return buf;
  }
  if (error === 0) {
    const buf = Buffer.allocUnsafe(P.STRUCTURED_REPLY_HEADER_BYTES);
    writeChunkHeader(buf, P.REPLY_FLAG_DONE, P.REPLY_TYPE_NONE, handle, 0);
    return buf;
  }
  const text = Buffer.from(message.slice(0, 200));
  const buf = Buffer.allocUnsafe(P.STRUCTURED_REPLY_HEADER_BYTES + 6 + text.length);
  writeChunkHeader(buf, P.REPLY_FLAG_DONE, P.REPLY_TYPE_ERROR, handle, 6 + text.length);
  buf.writeUInt32BE(error, 20);
  buf.writeUInt16BE(text.length, 24);
  text.copy(buf, 26);
  return buf;
}

/** A BLOCK_STATUS reply: one descriptor saying the whole range is allocated data. */
export function encodeBlockStatus(handle: Buffer, contextId: number, length: number): Buffer {
  const buf = Buffer.allocUnsafe(P.STRUCTURED_REPLY_HEADER_BYTES + 12);
  writeChunkHeader(buf, P.REPLY_FLAG_DONE, P.REPLY_TYPE_BLOCK_STATUS, handle, 12);
  buf.writeUInt32BE(contextId, 20);
  buf.writeUInt32BE(length, 24);
  buf.writeUInt32BE(P.STATE_DATA, 28);
  return buf;
}

function writeSimpleHeader(buf: Buffer, error: number, handle: Buffer): void {
  buf.writeUInt32BE(P.SIMPLE_REPLY_MAGIC, 0);
  buf.writeUInt32BE(error, 4);
  handle.copy(buf, 8, 0, 8);
}

function writeChunkHeader(buf: Buffer, flags: number, type: number, handle: Buffer, length: number): void {
  buf.writeUInt32BE(P.STRUCTURED_REPLY_MAGIC, 0);
  buf.writeUInt16BE(flags, 4);
  buf.writeUInt16BE(type, 6);
  handle.copy(buf, 8, 0, 8);
  buf.writeUInt32BE(length, 16);
}
