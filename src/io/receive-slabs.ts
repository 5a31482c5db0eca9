/**
 * Reads from an NBD client's socket into memory that is reused, instead of the fresh 64 KiB
 * buffer node allocates for every read.
 *
 * Why: at 1 MiB writes those per-read buffers live until their request's volume write is done,
 * and V8 counts them as external memory: a full mark-compact ran for every ~55 MB received, and
 * garbage collection took more CPU than the copies into the page cache (perf: V8's concurrent
 * marking and sweeping ~35 % of the samples, the kernel's copy 28 %). Read into reused slabs,
 * the same load ran 6 mark-compacts instead of ~130 and ~3× faster (README, Performance).
 *
 * A slab is reused only once nothing can still read it: every chunk read into it counts as a hold
 * until the receive queue drops it, and every WRITE payload view as a hold until its request
 * settles. A request that fails may leave I/O running on its views, so its slabs are never reused
 * (they go to the garbage collector). A hold that is never released only costs a slab.
 */
import net from 'node:net';

/** Each slab holds many reads; a read gets the slab's free tail (so one read can be ~2 MiB). */
export const SLAB_BYTES = 2 * 1024 * 1024;
/** A tail smaller than this is not worth a read: the next read goes to another slab. */
export const READ_BYTES_MIN = 256 * 1024;
/** Free slabs kept per connection for reuse (the rest go to the garbage collector). */
export const FREE_SLABS_MAX = 8;

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
  /** Slabs read into before `current`: reusable once they hold nothing. */
  private retired: Slab[] = [];
  private readonly byMemory = new Map<ArrayBufferLike, Slab>();
  /** Slabs allocated over the connection's life. */
  allocated = 0;

  /** Slabs kept: the current one, those still held, and the free ones kept for reuse. */
  get kept(): number {
    return this.byMemory.size;
  }

  /** `onAllocate` hears of every slab allocated (the server counts them). */
  constructor(private readonly onAllocate?: () => void) {
    this.current = this.allocate();
  }

  /** The memory the next read goes into. */
  nextReadBuffer(): Buffer {
    if (SLAB_BYTES - this.used < READ_BYTES_MIN) {
      this.retired.push(this.current);
      this.current = this.reusable() ?? this.allocate();
      this.used = 0;
    }
    return this.current.memory.subarray(this.used);
  }

  /** `n` bytes were read into `buffer` (what nextReadBuffer gave): the chunk, held until dropped. */
  filled(buffer: Buffer, n: number): Buffer {
    const expected = this.current.memory.byteOffset + this.used;
    if (buffer.buffer !== this.current.memory.buffer || buffer.byteOffset !== expected)
      throw new Error('receive slabs: a read landed outside the buffer it was given');
    this.used += n;
    this.current.holds++;
    return buffer.subarray(0, n);
  }

  /** The receive queue is done with a chunk that `filled` returned. */
  dropChunk(chunk: Buffer): void {
    const slab = this.byMemory.get(chunk.buffer);
    if (slab !== undefined) slab.holds--;
  }

  /** Views of received chunks (a WRITE payload) stay valid until release or abandon. */
  hold(views: readonly Buffer[]): void {
    for (const view of views) {
      const slab = this.byMemory.get(view.buffer);
      if (slab !== undefined) slab.holds++;
    }
  }

  release(views: readonly Buffer[]): void {
    for (const view of views) {
      const slab = this.byMemory.get(view.buffer);
      if (slab !== undefined) slab.holds--;
    }
  }

  /** Like release, but I/O may still read the views: their slabs are never reused. */
  abandon(views: readonly Buffer[]): void {
    for (const view of views) {
      const slab = this.byMemory.get(view.buffer);
      if (slab === undefined) continue;
      slab.holds--;
      slab.abandoned = true;
    }
  }

  /** A retired slab that holds nothing, if any; drops the free ones over FREE_SLABS_MAX. */
  private reusable(): Slab | undefined {
    let found: Slab | undefined;
    let free = 0;
    const kept: Slab[] = [];
    for (const slab of this.retired) {
      if (slab.abandoned) this.byMemory.delete(slab.memory.buffer);
      else if (slab.holds > 0) kept.push(slab);
      else if (found === undefined) found = slab;
      else if (free++ < FREE_SLABS_MAX) kept.push(slab);
      else this.byMemory.delete(slab.memory.buffer);
    }
    this.retired = kept;
    return found;
  }

  private allocate(): Slab {
    const slab: Slab = { memory: Buffer.allocUnsafeSlow(SLAB_BYTES), holds: 0, abandoned: false };
    this.byMemory.set(slab.memory.buffer, slab);
    this.allocated++;
    this.onAllocate?.();
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
