import { Counter, collectDefaultMetrics, Registry } from 'prom-client';
import { COMMAND_NAMES } from '../nbd/protocol.js';
import type { RequestStats } from '../nbd/server.js';

const COMMAND_SLOTS = 8;

/**
 * Prometheus metrics of one daemon, in a registry of its own (no globals). The per-request path
 * only bumps plain numbers; prom-client's counters are filled from them when /metrics is read,
 * because prom-client hashes the labels on every inc() even through labels().
 */
export class Metrics implements RequestStats {
  readonly registry = new Registry();
  private readonly ok = new Float64Array(COMMAND_SLOTS);
  private readonly failed = new Float64Array(COMMAND_SLOTS);
  private readonly bytes = new Float64Array(COMMAND_SLOTS);

  constructor() {
    collectDefaultMetrics({ register: this.registry, prefix: 'volrep_process_' });
    const ok = this.ok;
    const failed = this.failed;
    const bytes = this.bytes;
    new Counter({
      name: 'volrep_nbd_requests_total',
      help: 'NBD requests handled, by command and result',
      labelNames: ['command', 'result'] as const,
      registers: [this.registry],
      collect() {
        this.reset();
        for (const [code, name] of Object.entries(COMMAND_NAMES)) {
          this.inc({ command: name, result: 'ok' }, ok[Number(code)]);
          this.inc({ command: name, result: 'error' }, failed[Number(code)]);
        }
      },
    });
    new Counter({
      name: 'volrep_nbd_bytes_total',
      help: 'Bytes read or written through NBD, by command',
      labelNames: ['command'] as const,
      registers: [this.registry],
      collect() {
        this.reset();
        for (const [code, name] of Object.entries(COMMAND_NAMES))
          this.inc({ command: name }, bytes[Number(code)]);
      },
    });
  }

  record(command: number, bytes: number, error: number): void {
    // A rejected unknown command has no name to report it under.
    if (command >= COMMAND_SLOTS || COMMAND_NAMES[command] === undefined) return;
    if (error !== 0) {
      this.failed[command]++;
      return;
    }
    this.ok[command]++;
    this.bytes[command] += bytes;
  }
}
