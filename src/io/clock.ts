/**
 * Time for the shells: a monotonic clock in milliseconds and one-shot timers at an absolute
 * time. The sans-I/O machines are given `now` and say when they next need to be woken; the
 * shell arms one timer for that. The simulator passes a clock of its own.
 */
export interface Timer {
  cancel(): void;
}

export interface Clock {
  /** Milliseconds, never decreasing. */
  now(): number;
  /** Calls `fire` once, at or after `atMs` on this clock. */
  setTimer(atMs: number, fire: () => void): Timer;
}

/** The process's monotonic clock and node's timers (unref'd: they never keep a process alive). */
export const systemClock: Clock = {
  now: () => performance.now(),
  setTimer(atMs, fire) {
    const handle = setTimeout(fire, Math.max(0, Math.ceil(atMs - performance.now())));
    handle.unref();
    return { cancel: () => clearTimeout(handle) };
  },
};
