/**
 * The fixed newstyle negotiation as a state machine with no I/O: bytes in (a ChunkQueue), bytes
 * out (buffers to send) and, at the end, an outcome. Every malformed input either gets an option
 * error reply (the client may carry on) or ends the negotiation with a reason (the connection is
 * closed); nothing here throws on bad input.
 *
 * TLS (doc/proto.md, "TLS support"): with `tls: 'off'` STARTTLS gets NBD_REP_ERR_POLICY; with
 * 'on' a client may upgrade (SELECTIVETLS with no TLS-only export); with 'require' every option
 * but STARTTLS and ABORT gets NBD_REP_ERR_TLS_REQD until it does, and EXPORT_NAME (which cannot
 * be answered with an error) ends the session (FORCEDTLS). An accepted STARTTLS is the outcome
 * 'starttls': the server upgrades the socket, calls tlsStarted(), and feeds it on.
 */
import type { ChunkQueue } from '../io/chunk-queue.js';
import * as P from './protocol.js';

export interface ExportInfo {
  name: string;
  description: string;
  size: number;
  /** Transmission flags, TFLAG_HAS_FLAGS included. */
  flags: number;
}

export interface NegotiatedSession {
  structuredReplies: boolean;
  /** The metadata context id given to base:allocation by SET_META_CONTEXT, or 0 if none was set. */
  baseAllocationId: number;
}

export type HandshakeOutcome =
  | { kind: 'transmission'; session: NegotiatedSession }
  /** Send the output (the ACK), then upgrade the connection to TLS and call tlsStarted(). */
  | { kind: 'starttls' }
  | { kind: 'close'; reason: string; clientError: boolean };

export type NbdTlsMode = 'off' | 'on' | 'require';

type State = 'awaitClientFlags' | 'awaitOption' | 'upgrading' | 'finished';

/** Context id we hand out for base:allocation; any non-zero value would do. */
const BASE_ALLOCATION_CONTEXT_ID = 1;

export class Handshake {
  private state: State = 'awaitClientFlags';
  private noZeroes = false;
  private structuredReplies = false;
  private baseAllocationId = 0;
  private readonly output: Buffer[] = [];

  private tls = false;

  constructor(
    private readonly exp: ExportInfo,
    private readonly isShuttingDown: () => boolean = () => false,
    private readonly tlsMode: NbdTlsMode = 'off',
  ) {}

  /** The connection is now TLS: negotiation goes on over it. */
  tlsStarted(): void {
    if (this.state !== 'upgrading') throw new Error('tlsStarted() without an accepted STARTTLS');
    this.tls = true;
    this.state = 'awaitOption';
  }

  /** The server's opening bytes: magic, IHAVEOPT, handshake flags. */
  greeting(): Buffer {
    const buf = Buffer.alloc(18);
    buf.writeBigUInt64BE(P.NBD_MAGIC, 0);
    buf.writeBigUInt64BE(P.IHAVEOPT, 8);
    buf.writeUInt16BE(P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES, 16);
    return buf;
  }

  /**
   * Consumes as many complete messages as the queue holds. Returns the bytes to send and, once the
   * negotiation is over, its outcome; bytes after a GO stay in the queue for the transmission phase.
   */
  receive(queue: ChunkQueue): { output: Buffer[]; outcome?: HandshakeOutcome } {
    let outcome: HandshakeOutcome | undefined;
    while (outcome === undefined && this.state !== 'finished' && this.state !== 'upgrading') {
      if (this.state === 'awaitClientFlags') {
        if (queue.length < 4) break;
        outcome = this.onClientFlags(queue.take(4).readUInt32BE(0));
        continue;
      }
      if (this.optionHeader === undefined) {
        if (queue.length < P.OPTION_HEADER_BYTES) break;
        const header = queue.take(P.OPTION_HEADER_BYTES);
        const option = header.readUInt32BE(8);
        const length = header.readUInt32BE(12);
        if (header.readBigUInt64BE(0) !== P.IHAVEOPT) {
          outcome = this.close('bad option magic', true);
          break;
        }
        if (length > P.OPTION_DATA_BYTES_MAX) {
          outcome = this.close(`option ${option} data of ${length} bytes exceeds the limit`, true);
          break;
        }
        this.optionHeader = { option, length };
      }
      const { option, length } = this.optionHeader;
      if (queue.length < length) break;
      this.optionHeader = undefined;
      outcome = this.onOption(option, length === 0 ? Buffer.alloc(0) : queue.take(length));
    }
    const output = this.output.splice(0);
    return outcome ? { output, outcome } : { output };
  }

  /** The header of an option whose data has not all arrived yet. */
  private optionHeader: { option: number; length: number } | undefined;

  private onClientFlags(flags: number): HandshakeOutcome | undefined {
    if ((flags & ~P.CLIENT_FLAGS_KNOWN) !== 0)
      return this.close(`unknown client flags 0x${flags.toString(16)}`, true);
    this.noZeroes = (flags & P.CLIENT_FLAG_NO_ZEROES) !== 0;
    this.state = 'awaitOption';
    return undefined;
  }

  private onOption(option: number, data: Buffer): HandshakeOutcome | undefined {
    if (this.isShuttingDown() && option !== P.OPT_ABORT) {
      this.reply(option, P.REP_ERR_SHUTDOWN, 'server is shutting down');
      return this.close('server is shutting down', false);
    }
    if (this.tlsMode === 'require' && !this.tls && option !== P.OPT_STARTTLS && option !== P.OPT_ABORT) {
      // FORCEDTLS: nothing but STARTTLS before TLS; EXPORT_NAME cannot be refused, only cut.
      if (option === P.OPT_EXPORT_NAME)
        return this.close('NBD_OPT_EXPORT_NAME before TLS, which this server requires', true);
      this.reply(option, P.REP_ERR_TLS_REQD, 'this server requires TLS: send NBD_OPT_STARTTLS first');
      return undefined;
    }
    switch (option) {
      case P.OPT_STARTTLS:
        return this.onStartTls(data);
      case P.OPT_EXPORT_NAME:
        return this.onExportName(data);
      case P.OPT_ABORT:
        this.reply(option, P.REP_ACK);
        return this.close('client aborted the negotiation', false);
      case P.OPT_LIST:
        if (data.length !== 0) return this.invalid(option, 'NBD_OPT_LIST takes no data');
        this.reply(option, P.REP_SERVER, this.exportListEntry());
        this.reply(option, P.REP_ACK);
        return undefined;
      case P.OPT_INFO:
      case P.OPT_GO:
        return this.onInfoOrGo(option, data);
      case P.OPT_STRUCTURED_REPLY:
        if (data.length !== 0) return this.invalid(option, 'NBD_OPT_STRUCTURED_REPLY takes no data');
        if (this.structuredReplies) return this.invalid(option, 'structured replies already negotiated');
        this.structuredReplies = true;
        this.reply(option, P.REP_ACK);
        return undefined;
      case P.OPT_LIST_META_CONTEXT:
      case P.OPT_SET_META_CONTEXT:
        return this.onMetaContext(option, data);
      default:
        this.reply(option, P.REP_ERR_UNSUP, `option ${option} is not supported`);
        return undefined;
    }
  }

  private onStartTls(data: Buffer): HandshakeOutcome | undefined {
    if (this.tlsMode === 'off') {
      this.reply(P.OPT_STARTTLS, P.REP_ERR_POLICY, 'TLS is not enabled on this server (--nbd-tls)');
      return undefined;
    }
    if (this.tls) return this.invalid(P.OPT_STARTTLS, 'TLS is already running');
    if (data.length !== 0) return this.invalid(P.OPT_STARTTLS, 'NBD_OPT_STARTTLS takes no data');
    this.reply(P.OPT_STARTTLS, P.REP_ACK);
    this.state = 'upgrading';
    return { kind: 'starttls' };
  }

  private onExportName(data: Buffer): HandshakeOutcome {
    if (!this.matchesExport(data.toString('utf8'))) {
      // The protocol has no error reply for EXPORT_NAME: closing is the answer.
      return this.close(`unknown export '${data.toString('utf8').slice(0, 64)}'`, true);
    }
    const buf = Buffer.alloc(this.noZeroes ? 10 : 134);
    buf.writeBigUInt64BE(BigInt(this.exp.size), 0);
    buf.writeUInt16BE(this.transmissionFlags(), 8);
    this.output.push(buf);
    return this.finish();
  }

  private onInfoOrGo(option: number, data: Buffer): HandshakeOutcome | undefined {
    // Data: u32 name length, name, u16 count of info requests, u16 each.
    if (data.length < 6) return this.invalid(option, 'option data too short');
    const nameLength = data.readUInt32BE(0);
    if (nameLength > P.STRING_BYTES_MAX || 4 + nameLength + 2 > data.length) {
      return this.invalid(option, 'export name length does not fit the option');
    }
    const name = data.toString('utf8', 4, 4 + nameLength);
    const count = data.readUInt16BE(4 + nameLength);
    if (4 + nameLength + 2 + count * 2 !== data.length) {
      return this.invalid(option, 'info request count does not match the option length');
    }
    if (!this.matchesExport(name)) {
      this.reply(option, P.REP_ERR_UNKNOWN, `unknown export '${name.slice(0, 64)}'`);
      return undefined;
    }
    const requested = new Set<number>();
    for (let i = 0; i < count; i++) requested.add(data.readUInt16BE(4 + nameLength + 2 + i * 2));

    const exportInfo = Buffer.alloc(12);
    exportInfo.writeUInt16BE(P.INFO_EXPORT, 0);
    exportInfo.writeBigUInt64BE(BigInt(this.exp.size), 2);
    exportInfo.writeUInt16BE(this.transmissionFlags(), 10);
    this.reply(option, P.REP_INFO, exportInfo);
    if (requested.has(P.INFO_NAME)) {
      this.reply(option, P.REP_INFO, Buffer.concat([u16(P.INFO_NAME), Buffer.from(this.exp.name)]));
    }
    if (requested.has(P.INFO_DESCRIPTION)) {
      this.reply(
        option,
        P.REP_INFO,
        Buffer.concat([u16(P.INFO_DESCRIPTION), Buffer.from(this.exp.description)]),
      );
    }
    // Block sizes are sent whether asked or not: min 1 imposes nothing a client could trip on.
    const blockSize = Buffer.alloc(14);
    blockSize.writeUInt16BE(P.INFO_BLOCK_SIZE, 0);
    blockSize.writeUInt32BE(P.BLOCK_SIZE_MIN, 2);
    blockSize.writeUInt32BE(P.BLOCK_SIZE_PREFERRED, 6);
    blockSize.writeUInt32BE(P.PAYLOAD_BYTES_MAX, 10);
    this.reply(option, P.REP_INFO, blockSize);
    this.reply(option, P.REP_ACK);
    return option === P.OPT_GO ? this.finish() : undefined;
  }

  private onMetaContext(option: number, data: Buffer): HandshakeOutcome | undefined {
    if (!this.structuredReplies) return this.invalid(option, 'negotiate structured replies first');
    // Data: u32 name length, name, u32 query count, then u32 length + query for each.
    if (data.length < 8) return this.invalid(option, 'option data too short');
    const nameLength = data.readUInt32BE(0);
    if (nameLength > P.STRING_BYTES_MAX || 4 + nameLength + 4 > data.length) {
      return this.invalid(option, 'export name length does not fit the option');
    }
    const name = data.toString('utf8', 4, 4 + nameLength);
    const count = data.readUInt32BE(4 + nameLength);
    const queries: string[] = [];
    let at = 4 + nameLength + 4;
    for (let i = 0; i < count; i++) {
      if (at + 4 > data.length) return this.invalid(option, 'query count does not match the option length');
      const queryLength = data.readUInt32BE(at);
      at += 4;
      if (queryLength > P.STRING_BYTES_MAX || at + queryLength > data.length) {
        return this.invalid(option, 'query length does not fit the option');
      }
      queries.push(data.toString('utf8', at, at + queryLength));
      at += queryLength;
    }
    if (at !== data.length) return this.invalid(option, 'trailing bytes after the queries');
    if (!this.matchesExport(name)) {
      this.reply(option, P.REP_ERR_UNKNOWN, `unknown export '${name.slice(0, 64)}'`);
      return undefined;
    }
    const listing = option === P.OPT_LIST_META_CONTEXT;
    const selected =
      (listing && queries.length === 0) || queries.some((q) => q === 'base:' || q === P.BASE_ALLOCATION);
    if (!listing) this.baseAllocationId = selected ? BASE_ALLOCATION_CONTEXT_ID : 0;
    if (selected) {
      const id = listing ? 0 : BASE_ALLOCATION_CONTEXT_ID;
      this.reply(option, P.REP_META_CONTEXT, Buffer.concat([u32(id), Buffer.from(P.BASE_ALLOCATION)]));
    }
    this.reply(option, P.REP_ACK);
    return undefined;
  }

  private matchesExport(name: string): boolean {
    // The empty name selects the default export, which is the only one.
    return name === '' || name === this.exp.name;
  }

  private transmissionFlags(): number {
    return this.exp.flags;
  }

  private exportListEntry(): Buffer {
    const name = Buffer.from(this.exp.name);
    return Buffer.concat([u32(name.length), name]);
  }

  private invalid(option: number, message: string): undefined {
    this.reply(option, P.REP_ERR_INVALID, message);
    return undefined;
  }

  private reply(option: number, type: number, data?: Buffer | string): void {
    const payload = typeof data === 'string' ? Buffer.from(data) : (data ?? Buffer.alloc(0));
    const header = Buffer.alloc(20);
    header.writeBigUInt64BE(P.OPTION_REPLY_MAGIC, 0);
    header.writeUInt32BE(option, 8);
    header.writeUInt32BE(type, 12);
    header.writeUInt32BE(payload.length, 16);
    this.output.push(header);
    if (payload.length > 0) this.output.push(payload);
  }

  private finish(): HandshakeOutcome {
    this.state = 'finished';
    return {
      kind: 'transmission',
      session: { structuredReplies: this.structuredReplies, baseAllocationId: this.baseAllocationId },
    };
  }

  private close(reason: string, clientError: boolean): HandshakeOutcome {
    this.state = 'finished';
    return { kind: 'close', reason, clientError };
  }
}

function u16(n: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(n, 0);
  return b;
}

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n, 0);
  return b;
}
