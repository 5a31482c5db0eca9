import type { ReceiveSlabs } from './receive-slabs.js';

/**
 * A byte-stream connection as the replication shells see it: ordered bytes in and out, a close
 * that says why. node:net implements it (net.ts); the simulator implements it over a simulated
 * network that can delay, cut and blackhole.
 */
export interface Connection {
  /** Peer address, for logs and status. */
  readonly remote: string;
  /** Over TLS, with the peer's certificate checked. */
  readonly secure: boolean;
  /** The SHA-256 fingerprint of the peer's certificate (TLS), for status and logs. */
  readonly peerFingerprint: string | null;
  /**
   * Queues bytes to send, in order (never blocks; the caller bounds what it queues). `written`
   * is called once, when the connection reads the buffers no more: sent, copied, or never to be
   * sent (the connection went away); the caller may reuse the memory then.
   */
  write(buffers: readonly Buffer[], written?: Written): void;
  /** Ends the connection at once, dropping what is not sent yet; `close` follows on its events. */
  close(reason: string): void;
  /** Sends what is queued, then closes (a last word, like a refusal). */
  end(reason: string): void;
  /**
   * From a coming read on, read into reused memory (receive-slabs.ts) instead of a fresh buffer per
   * read (which, kept until the data is written, costs a full garbage collection every few tens of
   * MB). The caller then owns every chunk's hold: `dropChunk` each once done with it; views kept
   * longer, `hold` and `release` (or `abandon`). Absent where the transport cannot.
   */
  receiveIntoSlabs?(): ReceiveSlabs;
  /** Chunks now come from the slabs (for tests: node let the socket read that way). */
  readonly readsIntoSlabs?: boolean;
  /** Stops delivering `data` until `resume` (backpressure). */
  pause(): void;
  resume(): void;
}

export type Written = () => void;

/** What a connection reports to its owner. */
export interface ConnectionEvents {
  /** An outgoing connection is established (never called for an accepted one). */
  open(): void;
  data(chunk: Buffer): void;
  /**
   * The connection is gone (or never came up); called once. `refused`: it failed authentication
   * (TLS: either side refused the other's certificate), so dialing again soon will not help.
   */
  close(reason: string, refused: boolean): void;
}

/** Opens outgoing connections to one peer. */
export interface Dialer {
  readonly peer: string;
  dial(events: ConnectionEvents): Connection;
}
