import { isIP } from 'node:net';
import { VolrepError } from '../errors.js';

export interface HostPort {
  host: string;
  port: number;
}

/** Parses `HOST:PORT`, `[IPv6]:PORT` or a bare `PORT` (meaning 127.0.0.1). */
export function parseHostPort(text: string, what: string, defaultHost = '127.0.0.1'): HostPort {
  let host = defaultHost;
  let portText = text;
  const bracketed = /^\[([^\]]+)\]:(\d+)$/.exec(text);
  if (bracketed) {
    host = bracketed[1];
    portText = bracketed[2];
  } else if (text.includes(':')) {
    const at = text.lastIndexOf(':');
    host = text.slice(0, at);
    portText = text.slice(at + 1);
  }
  const port = Number(portText);
  if (!/^\d+$/.test(portText) || port > 65535 || host === '') {
    throw new VolrepError('VOLREP_ERR_ADDRESS', `invalid ${what} address '${text}': expected HOST:PORT`);
  }
  return { host, port };
}

export function formatHostPort({ host, port }: HostPort): string {
  return isIP(host) === 6 ? `[${host}]:${port}` : `${host}:${port}`;
}
