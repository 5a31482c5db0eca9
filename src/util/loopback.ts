import { isIP } from 'node:net';
import { VolrepError } from '../errors.js';

/** True for 127.0.0.0/8, ::1 and localhost. */
export function isLoopback(host: string): boolean {
  if (host === 'localhost') return true;
  if (isIP(host) === 4) return host.startsWith('127.');
  if (isIP(host) === 6) return host === '::1' || host === '0:0:0:0:0:0:0:1';
  return false;
}

/** Until replication is authenticated, volrep only speaks it over loopback. */
export function requireLoopback(host: string, what: string): void {
  if (!isLoopback(host)) {
    throw new VolrepError(
      'VOLREP_ERR_ADDRESS',
      `${what} ${host} is not a loopback address: replication has no authentication yet, so volrep only listens on and connects to 127.0.0.1 / ::1`,
    );
  }
}
