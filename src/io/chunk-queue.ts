/**
 * A receive queue over socket chunks that never concatenates on arrival: bytes are copied only
 * when a frame header straddles two chunks, and payloads are handed out as views of the chunks.
 */
export class ChunkQueue {
  private chunks: Buffer[] = [];
  private head = 0; // read position inside chunks[0]
  private total = 0;

  /** `onDrop` hears of every chunk once all its bytes were taken or discarded. */
  constructor(private readonly onDrop?: (chunk: Buffer) => void) {}

  get length(): number {
    return this.total;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.total += chunk.length;
  }

  /** The next `n` bytes as one buffer: a view when they lie in one chunk, else a copy. */
  take(n: number): Buffer {
    if (n > this.total) throw new RangeError(`take(${n}) with ${this.total} bytes queued`);
    const first = this.chunks[0];
    if (first !== undefined && first.length - this.head >= n) {
      const view = first.subarray(this.head, this.head + n);
      this.advance(n);
      return view;
    }
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    while (filled < n) {
      const chunk = this.chunks[0];
      const piece = Math.min(n - filled, chunk.length - this.head);
      chunk.copy(out, filled, this.head, this.head + piece);
      filled += piece;
      this.advance(piece);
    }
    return out;
  }

  /** The next `n` bytes as a list of views, without copying. */
  takeViews(n: number): Buffer[] {
    if (n > this.total) throw new RangeError(`takeViews(${n}) with ${this.total} bytes queued`);
    const views: Buffer[] = [];
    let left = n;
    while (left > 0) {
      const chunk = this.chunks[0];
      const piece = Math.min(left, chunk.length - this.head);
      views.push(chunk.subarray(this.head, this.head + piece));
      left -= piece;
      this.advance(piece);
    }
    return views;
  }

  /** Drops up to `n` bytes; returns how many were dropped. */
  discard(n: number): number {
    const dropped = Math.min(n, this.total);
    let left = dropped;
    while (left > 0) {
      const piece = Math.min(left, this.chunks[0].length - this.head);
      this.advance(piece);
      left -= piece;
    }
    return dropped;
  }

  private advance(n: number): void {
    this.head += n;
    this.total -= n;
    if (this.head === this.chunks[0].length) {
      const chunk = this.chunks.shift()!;
      this.head = 0;
      this.onDrop?.(chunk);
    }
  }
}
