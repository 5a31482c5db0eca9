/**
 * A small NBD client (fixed newstyle, NBD_OPT_GO, simple replies) used by `volrep demo` and the
 * tests, so that both can talk to a server without external tools. Requests may be pipelined.
 */
import net from 'node:net';
import { ChunkQueue } from '../io/chunk-queue.js';
import * as P from './protocol.js';

interface Pending {
  resolve: (data: Buffer) => void;
  reject: (err: Error) => void;
  readLength: number;
}

export class NbdClient {
  private readonly queue = new ChunkQueue();
  private readonly pending = new Map<bigint, Pending>();
  private nextHandle = 1n;
  private failure: Error | undefined;
  size = 0;
  flags = 0;

  private constructor(private readonly socket: net.Socket) {}

  static async connect(host: string, port: number, exportName = ''): Promise<NbdClient> {
    const socket = net.connect({ host, port, noDelay: true });
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', reject);
    });
    const client = new NbdClient(socket);
    await client.negotiate(exportName);
    return client;
  }

  private async negotiate(exportName: string): Promise<void> {
    const reader = new ByteReader(this.socket, this.queue);
    const hello = await reader.read(18);
    if (hello.readBigUInt64BE(0) !== P.NBD_MAGIC || hello.readBigUInt64BE(8) !== P.IHAVEOPT) {
      throw new Error('not an NBD newstyle server');
    }
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(P.CLIENT_FLAG_FIXED_NEWSTYLE | P.CLIENT_FLAG_NO_ZEROES);
    const name = Buffer.from(exportName);
    const data = Buffer.alloc(4 + name.length + 2);
    data.writeUInt32BE(name.length, 0);
    name.copy(data, 4);
    data.writeUInt16BE(0, 4 + name.length);
    const header = Buffer.alloc(16);
    header.writeBigUInt64BE(P.IHAVEOPT, 0);
    header.writeUInt32BE(P.OPT_GO, 8);
    header.writeUInt32BE(data.length, 12);
    this.socket.write(Buffer.concat([flags, header, data]));
    for (;;) {
      const reply = await reader.read(20);
      const type = reply.readUInt32BE(12);
      const payload = await reader.read(reply.readUInt32BE(16));
      if (type === P.REP_ACK) break;
      if (type >= 0x80000000) throw new Error(`server refused the export: ${payload.toString()}`);
      if (type === P.REP_INFO && payload.readUInt16BE(0) === P.INFO_EXPORT) {
        this.size = Number(payload.readBigUInt64BE(2));
        this.flags = payload.readUInt16BE(10);
      }
    }
    reader.detach();
    this.socket.on('data', (chunk: Buffer) => {
      this.queue.push(chunk);
      this.drainReplies();
    });
    const fail = (err: Error) => {
      this.failure ??= err;
      for (const p of this.pending.values()) p.reject(this.failure);
      this.pending.clear();
    };
    this.socket.on('error', fail);
    this.socket.on('close', () => fail(new Error('connection closed')));
    this.drainReplies();
  }

  /** The reply whose header has arrived but whose READ data has not, yet. */
  private current: { handle: bigint; error: number; need: number } | undefined;

  private drainReplies(): void {
    for (;;) {
      if (this.current === undefined) {
        if (this.queue.length < P.SIMPLE_REPLY_HEADER_BYTES) return;
        const header = this.queue.take(P.SIMPLE_REPLY_HEADER_BYTES);
        if (header.readUInt32BE(0) !== P.SIMPLE_REPLY_MAGIC) {
          this.socket.destroy(new Error('bad reply magic'));
          return;
        }
        const handle = header.readBigUInt64BE(8);
        const error = header.readUInt32BE(4);
        const pending = this.pending.get(handle);
        this.current = { handle, error, need: pending && error === 0 ? pending.readLength : 0 };
      }
      const { handle, error, need } = this.current;
      if (this.queue.length < need) return;
      this.current = undefined;
      const data = need > 0 ? Buffer.from(this.queue.take(need)) : Buffer.alloc(0);
      const pending = this.pending.get(handle);
      if (!pending) continue;
      this.pending.delete(handle);
      if (error !== 0) pending.reject(Object.assign(new Error(`NBD error ${error}`), { nbdError: error }));
      else pending.resolve(data);
    }
  }

  private request(
    command: number,
    flags: number,
    offset: number,
    length: number,
    payload?: Buffer,
  ): Promise<Buffer> {
    if (this.failure) return Promise.reject(this.failure);
    const handle = this.nextHandle++;
    const header = Buffer.alloc(P.REQUEST_HEADER_BYTES);
    header.writeUInt32BE(P.REQUEST_MAGIC, 0);
    header.writeUInt16BE(flags, 4);
    header.writeUInt16BE(command, 6);
    header.writeBigUInt64BE(handle, 8);
    header.writeBigUInt64BE(BigInt(offset), 16);
    header.writeUInt32BE(length, 24);
    return new Promise((resolve, reject) => {
      this.pending.set(handle, { resolve, reject, readLength: command === P.CMD_READ ? length : 0 });
      this.socket.write(header);
      if (payload) this.socket.write(payload);
    });
  }

  read(offset: number, length: number): Promise<Buffer> {
    return this.request(P.CMD_READ, 0, offset, length);
  }

  async write(offset: number, data: Buffer, fua = false): Promise<void> {
    await this.request(P.CMD_WRITE, fua ? P.CMD_FLAG_FUA : 0, offset, data.length, data);
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    await this.request(P.CMD_WRITE_ZEROES, 0, offset, length);
  }

  async trim(offset: number, length: number): Promise<void> {
    await this.request(P.CMD_TRIM, 0, offset, length);
  }

  async flush(): Promise<void> {
    await this.request(P.CMD_FLUSH, 0, 0, 0);
  }

  async close(): Promise<void> {
    const header = Buffer.alloc(P.REQUEST_HEADER_BYTES);
    header.writeUInt32BE(P.REQUEST_MAGIC, 0);
    header.writeUInt16BE(P.CMD_DISC, 6);
    if (this.socket.destroyed) return;
    await new Promise<void>((resolve) => {
      this.socket.once('close', () => resolve());
      this.socket.end(header);
    });
  }
}

/** Reads exact byte counts from a socket during negotiation. */
class ByteReader {
  private waiter: (() => void) | undefined;
  private readonly onData = (chunk: Buffer) => {
    this.queue.push(chunk);
    this.waiter?.();
  };

  constructor(
    private readonly socket: net.Socket,
    private readonly queue: ChunkQueue,
  ) {
    socket.on('data', this.onData);
  }

  async read(n: number): Promise<Buffer> {
    while (this.queue.length < n) {
      await new Promise<void>((resolve, reject) => {
        this.waiter = resolve;
        this.socket.once('close', () => reject(new Error('connection closed during negotiation')));
      });
    }
    return Buffer.from(this.queue.take(n));
  }

  detach(): void {
    this.socket.off('data', this.onData);
  }
}
