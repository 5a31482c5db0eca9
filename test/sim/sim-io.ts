/**
 * The simulated world's I/O: files and devices over SimDisks whose operations complete only when
 * the simulator says so (in any order, like a threadpool), a clock with timers, and a network of
 * ordered connections that the simulator can delay, cut and blackhole. Everything a node does
 * goes through here, so one seed decides every interleaving.
 */
import assert from 'node:assert/strict';
import type { BlockDevice, Done, Released } from '../../src/io/block-device.js';
import type { BlockFile } from '../../src/io/block-file.js';
import type { Clock, Timer } from '../../src/io/clock.js';
import { ReceiveSlabs } from '../../src/io/receive-slabs.js';
import type { Connection, ConnectionEvents, Dialer, Written } from '../../src/io/transport.js';
import type { Prng } from './prng.js';
import type { SimDisk } from './sim-disk.js';

export type NodeName = 'primary' | 'secondary';

// -------------------------------------------------------------------------------------------------
// Pending I/O

export interface PendingIo {
  node: NodeName;
  disk: SimDisk;
  what: string;
  kind: 'read' | 'write' | 'sync';
  offset: number;
  length: number;
  /** For writes: the bytes (copied at issue). */
  data?: Uint8Array;
  /** For writes: the tag the disk keeps with it (replica writes: their update id). */
  tag?: number;
  /** For syncs: the last write that had completed when it was issued. */
  syncSeq?: number;
  /** Performs the operation on the disk and calls back (never called if the node dies first). */
  finish(): void;
}

/** Every I/O operation issued and not yet completed, across both nodes. */
export class IoQueue {
  readonly pending: PendingIo[] = [];

  add(op: PendingIo): void {
    this.pending.push(op);
  }

  /** Completes one operation, chosen by the PRNG (completions come in any order). */
  completeOne(prng: Prng, node?: NodeName): PendingIo | undefined {
    const candidates = node === undefined ? this.pending : this.pending.filter((p) => p.node === node);
    if (candidates.length === 0) return undefined;
    const op = candidates[prng.int(candidates.length)];
    this.pending.splice(this.pending.indexOf(op), 1);
    op.finish();
    return op;
  }

  /**
   * The node is gone: its reads and syncs vanish; each write in flight lands in the page cache
   * whole, as a sector-aligned prefix, or not at all (a killed process's pwrite may be cut short).
   */
  dropNode(node: NodeName, prng: Prng): void {
    for (let i = this.pending.length - 1; i >= 0; i--) {
      const op = this.pending[i];
      if (op.node !== node) continue;
      this.pending.splice(i, 1);
      if (op.kind !== 'write' || op.data === undefined) continue;
      const mode = prng.int(3);
      if (mode === 0) op.disk.writeSync(op.offset, op.data, op.tag);
      else if (mode === 1) {
        const unit = op.disk.atomicBytes;
        const cut = Math.floor(prng.int(op.data.length + 1) / unit) * unit;
        if (cut > 0) op.disk.writeSync(op.offset, op.data.subarray(0, cut), 0);
      }
    }
  }

  /** Whether a write in flight touches [offset, offset + length) of the disk. */
  writeTouching(disk: SimDisk, offset: number, length: number): boolean {
    for (const op of this.pending) {
      if (
        op.disk === disk &&
        op.kind === 'write' &&
        op.offset < offset + length &&
        offset < op.offset + op.length
      )
        return true;
    }
    return false;
  }
}

/** A BlockFile whose operations wait in the IoQueue. */
export class SimFile implements BlockFile {
  readonly size: number;

  constructor(
    private readonly io: IoQueue,
    readonly node: NodeName,
    readonly disk: SimDisk,
    readonly name: string,
  ) {
    this.size = disk.size;
  }

  read(offset: number, length: number): Promise<Uint8Array> {
    return new Promise((resolve) =>
      this.io.add({
        node: this.node,
        disk: this.disk,
        what: `${this.name} read`,
        kind: 'read',
        offset,
        length,
        finish: () => resolve(this.disk.readSync(offset, length)),
      }),
    );
  }

  write(offset: number, data: Uint8Array): Promise<void> {
    assert.ok(offset >= 0 && offset + data.length <= this.size, `${this.name}: write outside the file`);
    const copy = new Uint8Array(data);
    return new Promise((resolve) =>
      this.io.add({
        node: this.node,
        disk: this.disk,
        what: `${this.name} write`,
        kind: 'write',
        offset,
        length: copy.length,
        data: copy,
        finish: () => {
          this.disk.writeSync(offset, copy);
          resolve();
        },
      }),
    );
  }

  sync(): Promise<void> {
    const syncSeq = this.disk.lastWriteSeq;
    return new Promise((resolve) =>
      this.io.add({
        node: this.node,
        disk: this.disk,
        what: `${this.name} sync`,
        kind: 'sync',
        offset: 0,
        length: 0,
        syncSeq,
        finish: () => {
          this.disk.syncUpTo(syncSeq);
          resolve();
        },
      }),
    );
  }
}

/** A BlockDevice (volume or replica) whose operations wait in the IoQueue. */
export class SimDevice implements BlockDevice {
  readonly readOnly = false;
  readonly reportsRelease = true;
  readonly size: number;
  /** Gives each write its tag (the simulator maps replica writes to update ids). */
  tagWrite: (offset: number, length: number) => number = () => 0;

  constructor(
    private readonly io: IoQueue,
    readonly node: NodeName,
    readonly disk: SimDisk,
    readonly name: string,
  ) {
    this.size = disk.size;
  }

  read(offset: number, length: number, buf: Buffer, at: number, done: Done): void {
    this.io.add({
      node: this.node,
      disk: this.disk,
      what: `${this.name} read`,
      kind: 'read',
      offset,
      length,
      finish: () => {
        buf.set(this.disk.view(offset, length), at);
        done(null);
      },
    });
  }

  write(offset: number, data: Buffer[], length: number, fua: boolean, done: Done, released?: Released): void {
    assert.equal(fua, false, 'the engine and the applier never ask the device for FUA');
    const bytes = Buffer.concat(data, length);
    // Copied here, but let go of when done, as a file does (the caller may reuse the memory then).
    this.issueWrite(offset, bytes, (err) => {
      released?.(err === null);
      done(err);
    });
  }

  writeZeroes(offset: number, length: number, fua: boolean, done: Done): void {
    assert.equal(fua, false);
    this.issueWrite(offset, new Uint8Array(length), done);
  }

  trim(offset: number, length: number, fua: boolean, done: Done): void {
    this.writeZeroes(offset, length, fua, done);
  }

  flush(done: Done): void {
    const syncSeq = this.disk.lastWriteSeq;
    this.io.add({
      node: this.node,
      disk: this.disk,
      what: `${this.name} sync`,
      kind: 'sync',
      offset: 0,
      length: 0,
      syncSeq,
      finish: () => {
        this.disk.syncUpTo(syncSeq);
        done(null);
      },
    });
  }

  private issueWrite(offset: number, bytes: Uint8Array, done: Done): void {
    assert.ok(offset >= 0 && offset + bytes.length <= this.size, `${this.name}: write outside the device`);
    const tag = this.tagWrite(offset, bytes.length);
    this.io.add({
      node: this.node,
      disk: this.disk,
      what: `${this.name} write ${offset}+${bytes.length}`,
      kind: 'write',
      offset,
      length: bytes.length,
      data: bytes,
      tag,
      finish: () => {
        this.disk.writeSync(offset, bytes, tag);
        done(null);
      },
    });
  }
}

// -------------------------------------------------------------------------------------------------
// Time

interface SimTimer {
  node: NodeName;
  atMs: number;
  seq: number;
  fire: () => void;
  cancelled: boolean;
}

/** Simulated time: one clock for the world, timers owned by a node (gone when it dies). */
export class SimTime {
  nowMs = 0;
  private timers: SimTimer[] = [];
  private seq = 0;

  clockFor(node: NodeName): Clock {
    return {
      now: () => this.nowMs,
      setTimer: (atMs, fire): Timer => {
        const t: SimTimer = { node, atMs, seq: this.seq++, fire, cancelled: false };
        this.timers.push(t);
        return { cancel: () => (t.cancelled = true) };
      },
    };
  }

  /** The earliest live timer's time. */
  nextTimerMs(): number {
    let at = Number.POSITIVE_INFINITY;
    for (const t of this.timers) if (!t.cancelled && t.atMs < at) at = t.atMs;
    return at;
  }

  /** Moves time forward and fires what is due, earliest first. */
  advance(toMs: number): number {
    assert.ok(toMs >= this.nowMs);
    this.nowMs = toMs;
    let fired = 0;
    for (;;) {
      this.timers = this.timers.filter((t) => !t.cancelled);
      const due = this.timers
        .filter((t) => t.atMs <= this.nowMs)
        .sort((a, b) => a.atMs - b.atMs || a.seq - b.seq)[0];
      if (due === undefined) return fired;
      due.cancelled = true;
      fired += 1;
      due.fire();
    }
  }

  dropNode(node: NodeName): void {
    for (const t of this.timers) if (t.node === node) t.cancelled = true;
  }
}

// -------------------------------------------------------------------------------------------------
// Network

/** Receive slabs of a simulated connection: small, so that a run reuses them many times. */
const SIM_SLAB_BYTES = 8 * 1024;

/** One end of a simulated connection. */
export class SimEnd implements Connection {
  readonly secure = false;
  readonly peerFingerprint = null;
  events: ConnectionEvents | undefined;
  /** Chunks on their way to this end. */
  readonly inbound: Buffer[] = [];
  paused = false;
  /** This end's owner closed it (or its node died). */
  closed = false;
  /** The close has been reported to this end's owner. */
  closeReported = false;
  /** A close from the other side is on its way, after the inbound bytes. */
  closeComing: string | undefined;
  /** Where delivered bytes go when the owner asked for reused memory (small slabs: reused often). */
  slabs: ReceiveSlabs | undefined;
  other!: SimEnd;

  constructor(
    readonly conn: SimConnection,
    readonly node: NodeName,
    readonly remote: string,
  ) {}

  write(buffers: readonly Buffer[], written?: Written): void {
    // After a reset nothing more gets through, though the ends have not heard of it yet (TCP
    // never delivers bytes after a gap).
    if (this.closed || this.other.closed || this.conn.wasReset) return written?.();
    // Copied here, so the caller's memory is free at once (the workload then scribbles on it).
    const chunk = Buffer.concat(buffers as Buffer[]);
    written?.();
    if (chunk.length === 0) return;
    this.conn.network.onSend(this, chunk);
    this.other.inbound.push(chunk);
  }

  close(reason: string): void {
    if (this.closed) return;
    this.closed = true;
    this.inbound.length = 0;
    this.conn.network.trace(`${this.node} closes a connection: ${reason}`);
    // Our own close is reported to our owner at once (like a destroyed socket's 'close').
    this.conn.network.reportClose(this, reason);
    this.other.closeComing ??= 'connection reset by peer';
  }

  end(reason: string): void {
    if (this.closed) return;
    this.closed = true;
    this.inbound.length = 0;
    this.conn.network.trace(`${this.node} ends a connection: ${reason}`);
    this.conn.network.reportClose(this, reason);
    // What we wrote still arrives, then the end.
    this.other.closeComing ??= 'connection closed by peer';
  }

  pause(): void {
    this.paused = true;
  }

  receiveIntoSlabs(): ReceiveSlabs {
    if (this.slabs === undefined) {
      this.slabs = new ReceiveSlabs(undefined, SIM_SLAB_BYTES);
      this.slabs.negotiated();
    }
    return this.slabs;
  }

  resume(): void {
    this.paused = false;
  }
}

export class SimConnection {
  readonly dialer: SimEnd;
  readonly acceptor: SimEnd;
  /** Not yet accepted by the listener (connect in progress). */
  establishing = true;
  /** Reset by the network: both ends will hear of it; no byte goes through any more. */
  wasReset = false;

  constructor(
    readonly network: SimNetwork,
    readonly id: number,
  ) {
    this.dialer = new SimEnd(this, 'primary', 'secondary:10810');
    this.acceptor = new SimEnd(this, 'secondary', `primary:${40000 + id}`);
    this.dialer.other = this.acceptor;
    this.acceptor.other = this.dialer;
  }
}

/**
 * The network between the two hosts: connections from the primary (dialer) to the secondary
 * (listener). The simulator delivers bytes and closes one step at a time, in order within a
 * connection. `blackholed` (a partition) holds everything, bytes and connection attempts, until
 * healed — TCP retransmits, so a stream is delayed, never cut in the middle; ends that give up
 * meanwhile close, and the other end hears of it once the link is back.
 */
export class SimNetwork {
  readonly connections: SimConnection[] = [];
  blackholed = false;
  private nextId = 1;
  /** The secondary's listener: null while the secondary is not listening. */
  listener: ((connection: Connection) => ConnectionEvents) | null = null;
  /** Bytes sent by an end, and bytes delivered to one (the simulator sniffs both). */
  onSend: (from: SimEnd, chunk: Buffer) => void = () => {};
  onDeliver: (to: SimEnd, chunk: Buffer) => void = () => {};
  trace: (line: string) => void = () => {};

  dialer(): Dialer {
    return {
      peer: 'secondary:10810',
      dial: (events) => {
        const conn = new SimConnection(this, this.nextId++);
        conn.dialer.events = events;
        this.connections.push(conn);
        this.trace(`primary dials (connection ${conn.id})`);
        return conn.dialer;
      },
    };
  }

  /** Reports a close to its end's owner, once. */
  reportClose(end: SimEnd, reason: string): void {
    if (end.closeReported) return;
    end.closeReported = true;
    end.events?.close(reason, false);
  }

  /** Things the network can do next, for the scheduler. */
  steps(prng?: Prng): Array<() => void> {
    const out: Array<() => void> = [];
    if (this.blackholed) return out;
    for (const conn of this.connections) {
      if (conn.establishing) {
        if (!conn.dialer.closed) out.push(() => this.establish(conn));
        continue;
      }
      for (const end of [conn.dialer, conn.acceptor]) {
        if (end.closeReported) continue;
        if (end.inbound.length > 0 && !end.paused) out.push(() => this.deliver(end, prng));
        else if (end.inbound.length === 0 && end.closeComing !== undefined)
          out.push(() => this.deliverClose(end));
      }
    }
    return out;
  }

  /** A connect attempt arrives: accepted if the secondary listens, refused if not. */
  establish(conn: SimConnection): void {
    if (!conn.establishing) return;
    conn.establishing = false;
    if (this.listener === null) {
      this.trace(`connection ${conn.id} refused (nobody listens)`);
      conn.acceptor.closed = true;
      conn.acceptor.closeReported = true;
      this.reportClose(conn.dialer, 'connection refused');
      return;
    }
    this.trace(`connection ${conn.id} established`);
    conn.acceptor.events = this.listener(conn.acceptor);
    conn.dialer.events?.open();
  }

  /** Delivers the next chunk (or a prefix of it) to an end. */
  deliver(end: SimEnd, prng?: Prng): void {
    // In a burst, an earlier delivery may have closed this end or emptied it.
    if (end.inbound.length === 0 || end.paused || end.closeReported) return;
    let chunk = end.inbound[0];
    if (prng !== undefined && chunk.length > 1 && prng.chance(0.3)) {
      const cut = 1 + prng.int(chunk.length - 1);
      end.inbound[0] = chunk.subarray(cut);
      chunk = chunk.subarray(0, cut);
    } else {
      end.inbound.shift();
    }
    if (end.closed) return;
    this.onDeliver(end, chunk);
    if (end.slabs === undefined) return end.events?.data(chunk);
    // Into the owner's slabs, as a socket reading into them would (a read fills a slab's tail).
    for (let at = 0; at < chunk.length && !end.closed; ) {
      const into = end.slabs.nextReadBuffer();
      const n = chunk.copy(into, 0, at, Math.min(chunk.length, at + into.length));
      at += n;
      end.events?.data(end.slabs.filled(into, n));
    }
  }

  deliverClose(end: SimEnd): void {
    if (end.closeReported) return;
    const reason = end.closeComing ?? 'closed';
    end.closed = true;
    this.reportClose(end, reason);
  }

  /** A connection reset: both ends lose what is in flight and learn of it. */
  reset(conn: SimConnection): void {
    this.trace(`connection ${conn.id} RESET`);
    conn.wasReset = true;
    for (const end of [conn.dialer, conn.acceptor]) {
      end.inbound.length = 0;
      end.closeComing ??= 'connection reset';
    }
  }

  /**
   * A node is gone. Killed: its kernel closes its sockets (what it sent still arrives, then the
   * close). Powered off: nothing more comes from it, and the peer hears nothing (a silent link).
   */
  dropNode(node: NodeName, power: boolean, prng: Prng): void {
    for (const conn of this.connections) {
      const mine = node === 'primary' ? conn.dialer : conn.acceptor;
      if (mine.closed && mine.closeReported && mine.other.closeComing !== undefined) continue;
      mine.closed = true;
      mine.closeReported = true;
      mine.inbound.length = 0;
      conn.establishing = false;
      if (power) {
        // Some of what it sent was still on the wire.
        mine.other.inbound.splice(prng.int(mine.other.inbound.length + 1));
      } else {
        mine.other.closeComing ??= 'connection reset by peer';
      }
    }
  }

  /** Forgets connections both of whose ends are done. */
  prune(): void {
    for (let i = this.connections.length - 1; i >= 0; i--) {
      const c = this.connections[i];
      const done = (e: SimEnd) =>
        e.closeReported || (e.closed && e.inbound.length === 0 && e.closeComing === undefined);
      // A connect attempt the dialer gave up on never arrives.
      const abandoned = c.establishing && c.dialer.closed;
      if (abandoned || (!c.establishing && done(c.dialer) && done(c.acceptor))) this.connections.splice(i, 1);
    }
  }

  /** Whether anything is on its way. */
  busy(): boolean {
    return this.steps().length > 0;
  }
}
