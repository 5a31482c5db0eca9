/**
 * Writes to a TLS socket through two reused staging buffers.
 *
 * Node's TLS stream encrypts one buffer at a time: handed several (a corked write, or the
 * writes a busy stream queued up), it first copies them all into one new allocation of their
 * total size. At replication rates that is a fresh multi-MiB allocation per write, each page of
 * it faulted in and zeroed by the kernel: a 1 GiB full sync took ~280,000 extra page faults on
 * the primary. Here the copy goes into two buffers allocated once, and at most two writes are
 * outstanding, so the stream never holds more than one queued buffer and never concatenates.
 */
import type { Socket } from 'node:net';
import type { Written } from './transport.js';

/** Bytes per staged write (a power of two well above TLS's 16 KiB record). */
export const STAGE_BYTES = 256 * 1024;

const EMPTY = Buffer.alloc(0);

export class StagedWriter {
  /** Allocated at the first write (a refused connection never needs them). */
  private stages: Buffer[] = [];
  /** The stage the next write fills (writes complete in order, so they alternate). */
  private nextStage = 0;
  private outstanding = 0;
  /** What is still to stage: `queue[head]` onwards, its first `headOffset` bytes staged already. */
  private queue: Buffer[] = [];
  private head = 0;
  private headOffset = 0;
  /** Buffers queued, and fully staged, since the start (the queue itself is compacted). */
  private queued = 0;
  private staged = 0;
  /** Callers waiting to hear that their buffers are staged: `written` once `staged` reaches `upTo`. */
  private owed: Array<{ upTo: number; written: Written }> = [];
  private ending = false;
  /** A write failed: the socket is going away, nothing more is worth copying. */
  private failed = false;

  constructor(private readonly socket: Socket) {}

  /**
   * Queues bytes to send, in order (copied into a stage before the call returns only if one is
   * free); `written` once all of them are copied (the writer reads them no more).
   */
  write(buffers: readonly Buffer[], written?: Written): void {
    if (this.failed) return written?.(); // the socket is going away: nothing will read them
    for (const b of buffers) {
      if (b.length === 0) continue;
      this.queue.push(b);
      this.queued += 1;
    }
    if (written !== undefined) {
      if (this.queued === this.staged) written();
      else this.owed.push({ upTo: this.queued, written });
    }
    this.pump();
    if (this.head > 1024 && this.head * 2 > this.queue.length) {
      this.queue = this.queue.slice(this.head);
      this.head = 0;
    }
  }

  /** The socket is gone: what is still queued will never be staged (its callers hear so now). */
  abandon(): void {
    this.failed = true;
    this.queue = [];
    this.head = 0;
    this.headOffset = 0;
    const owed = this.owed;
    this.owed = [];
    for (const { written } of owed) written();
  }

  /** Ends the socket once everything queued is handed to it. */
  end(): void {
    this.ending = true;
    this.pump();
  }

  private pump(): void {
    if (this.stages.length === 0 && this.head < this.queue.length)
      this.stages = [Buffer.allocUnsafeSlow(STAGE_BYTES), Buffer.allocUnsafeSlow(STAGE_BYTES)];
    while (
      this.outstanding < this.stages.length &&
      this.head < this.queue.length &&
      !this.failed &&
      !this.socket.destroyed
    ) {
      const stage = this.stages[this.nextStage];
      this.nextStage = (this.nextStage + 1) % this.stages.length;
      let filled = 0;
      while (filled < STAGE_BYTES && this.head < this.queue.length) {
        const next = this.queue[this.head];
        const n = next.copy(stage, filled, this.headOffset);
        filled += n;
        this.headOffset += n;
        if (this.headOffset === next.length) {
          this.queue[this.head] = EMPTY; // let it go now, not when the queue is compacted
          this.head += 1;
          this.headOffset = 0;
          this.staged += 1;
        }
      }
      this.outstanding += 1;
      // The callback means the stream is done with the stage (encrypted and sent, or failed).
      this.socket.write(stage.subarray(0, filled), (err) => {
        this.outstanding -= 1;
        if (err) this.failed = true;
        else this.pump();
      });
    }
    let settled = 0;
    while (settled < this.owed.length && this.owed[settled].upTo <= this.staged) settled++;
    if (settled > 0) for (const { written } of this.owed.splice(0, settled)) written();
    if (this.ending && this.head === this.queue.length && !this.failed && !this.socket.destroyed) {
      this.ending = false;
      this.socket.end();
    }
  }
}
