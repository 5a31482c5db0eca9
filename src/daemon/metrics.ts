import { Counter, collectDefaultMetrics, Registry } from 'prom-client';
import { COMMAND_NAMES } from '../nbd/protocol.js';
import type { RequestStats } from '../nbd/server.js';

/** Prometheus metrics of one daemon, in a registry of its own (no globals). */
export class Metrics implements RequestStats {
  readonly registry = new Registry();
  private readonly requests = new Counter({
    name: 'volrep_nbd_requests_total',
    help: 'NBD requests handled, by command and result',
    labelNames: ['command', 'result'] as const,
    registers: [this.registry],
  });
  private readonly bytes = new Counter({
    name: 'volrep_nbd_bytes_total',
    help: 'Bytes read or written through NBD, by command',
    labelNames: ['command'] as const,
    registers: [this.registry],
  });
  // Bound children per command: the per-request cost is one add, not a label lookup.
  private readonly okByCommand = new Map<number, Counter.Internal>();
  private readonly bytesByCommand = new Map<number, Counter.Internal>();

  constructor() {
    collectDefaultMetrics({ register: this.registry, prefix: 'volrep_process_' });
    for (const [code, name] of Object.entries(COMMAND_NAMES)) {
      this.okByCommand.set(Number(code), this.requests.labels({ command: name, result: 'ok' }));
      this.bytesByCommand.set(Number(code), this.bytes.labels({ command: name }));
    }
  }

  record(command: number, bytes: number, error: number): void {
    if (error === 0) {
      this.okByCommand.get(command)?.inc();
      if (bytes > 0) this.bytesByCommand.get(command)?.inc(bytes);
      return;
    }
    this.requests.inc({ command: COMMAND_NAMES[command] ?? 'unknown', result: 'error' });
  }
}
