import { errnoCode, VolrepError } from '../errors.js';
import { formatHostPort, type HostPort } from '../util/address.js';

/** Turns a listen() failure into one clear line. */
export function listenError(err: unknown, what: string, address: HostPort): VolrepError {
  const where = formatHostPort(address);
  switch (errnoCode(err)) {
    case 'EADDRINUSE':
      return new VolrepError('VOLREP_ERR_ADDRESS_IN_USE', `${what} address ${where} is already in use`);
    case 'EADDRNOTAVAIL':
    case 'ENOTFOUND':
    case 'EAI_AGAIN':
      return new VolrepError('VOLREP_ERR_ADDRESS', `${what} address ${where} is not an address of this host`);
    case 'EACCES':
      return new VolrepError('VOLREP_ERR_ADDRESS', `${what} address ${where}: permission denied`);
    default:
      return new VolrepError('VOLREP_ERR_IO', `${what} cannot listen on ${where}: ${(err as Error).message}`);
  }
}
