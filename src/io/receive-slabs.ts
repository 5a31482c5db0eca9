/**
 * Reads a socket into memory that is reused (an NBD client's, a secondary's replication link),
 * instead of the fresh buffer node allocates for every read (64 KiB; 16 KiB through TLS).
 *
 * Why: at 1 MiB writes those per-read buffers live until their request's volume write is done,
 * and V8 counts them as external memory: a full mark-compact ran for every ~55 MB received, and
 * garbage collection took more CPU than the copies into the page cache (perf: V8's concurrent
 * marking and sweeping ~35 % of the samples, the kernel's copy 28 %). Read into reused slabs,
 * the same load ran 5 mark-compacts instead of ~130, at about a third of the CPU per write
 * (README, Performance).
 *
 * A slab is reused only once nothing can still read it: every chunk read into it counts as a hold
 * until the receive queue drops it, and every view kept longer (a WRITE payload, an update's
 * data) as a hold until whoever writes it lets go (BlockDevice's `released`: after the volume
 * write, and for a replicating primary after the send). Where some I/O may still read a view
 * (a failed write, a node that stopped), its slabs are never reused (they go to the garbage
 * collector). A hold that is never released only costs a slab.
 */
import net from 'node:net';

/** Each slab holds many reads; a read gets the slab's free tail (so one read can be ~2 MiB). */
export const SLAB_BYTES = 2 * 1024 * 1024;
/** A tail smaller than this is not worth a read: the next read goes to another slab. */
export const READ_BYTES_MIN = 256 * 1024;
/** Free slabs kept per connection for reuse (the rest go to the garbage collector). */
export const FREE_SLABS_MAX = 8;
/** The first read's buffer (the negotiation's few bytes; a connection that stops there costs little). */
export const FIRST_READ_BYTES = 16 * 1024;

interface Slab {
  readonly memory: Buffer;
  /** Chunks in the receive queue and payload views not yet released. */
  holds: number;
  /** Some view of it may still be read by I/O nobody waits for: never reuse it. */
  abandoned: boolean;
}

export class ReceiveSlabs {
  private current: Slab;
  /** Bytes of `current` already read into (never handed out again while it is current). */
  private used = 0;
  /** Slabs read into before `current`: still held, or free for reuse (at most FREE_SLABS_MAX free). */
  private retired: Slab[] = [];
  private readonly byMemory = new Map<ArrayBufferLike, Slab>();
  /** Every slab made, forgotten ones too (until the collector takes them). */
  private readonly made = new WeakMap<ArrayBufferLike, Slab>();
  /** Slabs, `current` included, that something holds. */
  private held = 0;
  /** Slabs allocated over the connection's life. */
  allocated = 0;
  /** Until requests may come, reads reuse the small first buffer whenever nothing holds it. */
  private negotiating = true;

  private readonly slabBytes: number;
  private readonly readBytesMin: number;

  /**
   * `onAllocate` hears of every slab allocated (the server counts them). Smaller `slabBytes` (reads
   * scaled down with them) are for tests that want slabs reused often.
   */
  constructor(
    private readonly onAllocate?: () => void,
    slabBytes = SLAB_BYTES,
  ) {
    this.slabBytes = slabBytes;
    this.readBytesMin = Math.max(1, Math.floor((slabBytes * READ_BYTES_MIN) / SLAB_BYTES));
    // The negotiation reads a few bytes: a small first buffer, not a slab, until it is done.
    this.current = this.track(Buffer.allocUnsafeSlow(FIRST_READ_BYTES));
  }

  /** Slabs kept: the current one, those still held, and the free ones kept for reuse. */
  get kept(): number {
    return this.byMemory.size;
  }

  /** Bytes of memory that something still holds (what a connection must bound, not just its requests). */
  get heldBytes(): number {
    return this.held * this.slabBytes;
  }

  /** Requests may come from here on: reads go to slabs. */
  negotiated(): void {
    this.negotiating = false;
  }

  /** The memory the next read goes into. */
  nextReadBuffer(): Buffer {
    if (this.negotiating && this.current.holds === 0) this.used = 0;
    const tail = this.current.memory.length - this.used;
    if (this.used > 0 && tail < this.readBytesMin) {
      const old = this.current;
      this.current = this.reusable() ?? this.allocate();
      this.used = 0;
      this.retired.push(old);
      if (old.holds === 0) this.settle(old);
    }
    return this.current.memory.subarray(this.used);
  }

  /** `n` bytes were read into `buffer` (what nextReadBuffer gave): the chunk, held until dropped. */
  filled(buffer: Buffer, n: number): Buffer {
    const expected = this.current.memory.byteOffset + this.used;
    if (buffer.buffer !== this.current.memory.buffer || buffer.byteOffset !== expected)
      throw new Error('receive slabs: a read landed outside the buffer it was given');
    this.used += n;
    this.adjust(this.current, +1);
    return buffer.subarray(0, n);
  }

  /** The receive queue is done with a chunk that `filled` returned. */
  dropChunk(chunk: Buffer): void {
    const slab = this.byMemory.get(chunk.buffer);
    if (slab !== undefined) this.adjust(slab, -1);
  }

  /** Views of received chunks (a WRITE payload) stay valid until release or abandon. */
  hold(views: readonly Buffer[]): void {
    for (const view of views) {
      const slab = this.byMemory.get(view.buffer) ?? this.readopt(view.buffer);
      if (slab !== undefined) this.adjust(slab, +1);
    }
  }

  /**
   * A slab let go of (forgotten) in the moment between its last chunk leaving the queue and a view
   * of it being held (a session drops a chunk before its owner holds the update in it): tracked
   * again, so that the view counts. Safe: a forgotten slab was never handed out again.
   */
  private readopt(memory: ArrayBufferLike): Slab | undefined {
    const slab = this.made.get(memory);
    if (slab === undefined) return undefined;
    this.byMemory.set(memory, slab);
    this.retired.push(slab);
    return slab;
  }

  release(views: readonly Buffer[]): void {
    for (const view of views) {
      const slab = this.byMemory.get(view.buffer);
      if (slab !== undefined) this.adjust(slab, -1);
    }
  }

  /** Like release, but I/O may still read the views: their slabs are never reused. */
  abandon(views: readonly Buffer[]): void {
    for (const view of views) {
      const slab = this.byMemory.get(view.buffer);
      if (slab === undefined) continue;
      slab.abandoned = true;
      this.adjust(slab, -1);
    }
  }

  private adjust(slab: Slab, delta: number): void {
    const before = slab.holds;
    slab.holds += delta;
    if (before === 0 && slab.holds > 0) this.held++;
    else if (before > 0 && slab.holds === 0) {
      this.held--;
      if (slab !== this.current) this.settle(slab);
    }
  }

  /**
   * A retired slab nothing holds any more: kept for reuse, unless it was abandoned, is the small
   * first buffer, or FREE_SLABS_MAX are kept already — then forgotten (left to the collector).
   */
  private settle(slab: Slab): void {
    let free = 0; // this one included
    for (const s of this.retired) if (s.holds === 0) free++;
    if (slab.abandoned || slab.memory.length !== this.slabBytes || free > FREE_SLABS_MAX) this.forget(slab);
  }

  /** A retired slab that holds nothing, if any (every such slab is fit for reuse). */
  private reusable(): Slab | undefined {
    const index = this.retired.findIndex((s) => s.holds === 0);
    if (index < 0) return undefined;
    const [slab] = this.retired.splice(index, 1);
    return slab;
  }

  private forget(slab: Slab): void {
    this.byMemory.delete(slab.memory.buffer);
    const index = this.retired.indexOf(slab);
    if (index >= 0) this.retired.splice(index, 1);
  }

  private allocate(): Slab {
    this.allocated++;
    this.onAllocate?.();
    return this.track(Buffer.allocUnsafeSlow(this.slabBytes));
  }

  private track(memory: Buffer): Slab {
    const slab: Slab = { memory, holds: 0, abandoned: false };
    this.byMemory.set(memory.buffer, slab);
    this.made.set(memory.buffer, slab);
    return slab;
  }
}

/**
 * Moves an accepted socket's connection to a socket that reads into `slabs`, calling `onChunk`
 * with every chunk. Node takes `onread` only for sockets it creates itself, not for those a server
 * accepts, so the accepted socket's handle is handed over (the server must accept with
 * `pauseOnConnect`, so that nothing was read yet). Returns undefined, leaving `accepted` as it
 * was, where this node does not have what that needs.
 */
export function adoptWithPooledReads(
  accepted: net.Socket,
  slabs: ReceiveSlabs,
  onChunk: (chunk: Buffer) => void,
): net.Socket | undefined {
  const holder = accepted as unknown as { _handle?: { useUserBuffer?: unknown; reading?: boolean } | null };
  const handle = holder._handle;
  if (handle == null || typeof handle.useUserBuffer !== 'function' || handle.reading === true)
    return undefined;
  holder._handle = null;
  // The accepted socket, now without its connection, is closed at once (it counts as the server's
  // connection: closing it keeps server.close from waiting on one that moved).
  accepted.destroy();
  // `handle` is not a public option: it is what node's own server passes for a connection it accepted.
  const options: net.SocketConstructorOpts & net.ConnectOpts & { handle: unknown } = {
    handle,
    onread: {
      buffer: () => slabs.nextReadBuffer(),
      callback: (n: number, buffer: Uint8Array) => {
        onChunk(slabs.filled(buffer as Buffer, n));
        return true; // pause() and resume() still decide whether it reads on
      },
    },
  };
  const socket = new net.Socket(options);
  socket.setNoDelay(true);
  return socket;
}

/**
 * Switches a socket that is already reading (a TLS socket a server handed over, say) to reading
 * into `slabs`, calling `onChunk` with every chunk from the next read on (no more 'data' events).
 * Node takes a socket's read memory only from its constructor's `onread` option, which a TLS
 * socket made over an accepted socket ignores; this sets the same fields that option sets (node's
 * own, found by name) and hands the memory to the socket's handle. Call it only while the socket
 * has nothing buffered (inside a 'data' handler, with `readableLength` 0), or bytes would come out
 * of order. Returns false, leaving the socket as it was, where this node lacks what that needs.
 */
export function readIntoSlabs(
  socket: net.Socket,
  slabs: ReceiveSlabs,
  onChunk: (chunk: Buffer) => void,
): boolean {
  const handle = (socket as unknown as { _handle?: { useUserBuffer?: (b: Uint8Array) => void } | null })
    ._handle;
  if (handle == null || typeof handle.useUserBuffer !== 'function' || socket.readableLength > 0) return false;
  const fields = socket as unknown as Record<symbol, unknown>;
  const field = (name: string) => Object.getOwnPropertySymbols(socket).find((s) => s.description === name);
  const kBuffer = field('kBuffer');
  const kBufferCb = field('kBufferCb');
  const kBufferGen = field('kBufferGen');
  if (kBuffer === undefined || kBufferCb === undefined || kBufferGen === undefined) return false;
  if (fields[kBuffer] !== null || fields[kBufferCb] !== null || fields[kBufferGen] !== null) return false;
  const first = slabs.nextReadBuffer();
  fields[kBufferGen] = () => slabs.nextReadBuffer();
  fields[kBufferCb] = (n: number, buffer: Uint8Array) => {
    onChunk(slabs.filled(buffer as Buffer, n));
    return true; // pause() and resume() still decide whether it reads on
  };
  fields[kBuffer] = first;
  handle.useUserBuffer(first);
  // A socket paused before now still has its handle reading (only the stream stopped flowing),
  // and the read(0) the stream queues after this 'data' event (maybeReadMore, a tick behind)
  // would start it again: reading into user memory, only a pause() from here on stops the handle,
  // so pause it again once that has run (found in review).
  process.nextTick(() =>
    process.nextTick(() => {
      if (socket.readableFlowing === false && !socket.destroyed) socket.pause();
    }),
  );
  return true;
}
