import http from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Logger } from 'pino';
import type { Registry } from 'prom-client';

/**
 * The optional HTTP endpoint: `GET /status` (JSON) and `GET /metrics` (Prometheus text).
 * Read-only; anything else is 404 or 405.
 */
export async function startHttp(
  host: string,
  port: number,
  status: () => unknown,
  registry: Registry,
  logger: Logger,
  routes: Record<string, () => unknown> = {},
): Promise<{ address: AddressInfo; close: () => Promise<void> }> {
  const server = http.createServer((req, res) => {
    const url = (req.url ?? '/').split('?')[0];
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { allow: 'GET' }).end('method not allowed\n');
      return;
    }
    if (url === '/status') {
      res
        .writeHead(200, { 'content-type': 'application/json' })
        .end(`${JSON.stringify(status(), null, 2)}\n`);
      return;
    }
    const route = routes[url];
    if (route) {
      res.writeHead(200, { 'content-type': 'application/json' }).end(`${JSON.stringify(route())}\n`);
      return;
    }
    if (url === '/metrics') {
      registry.metrics().then(
        (text) => res.writeHead(200, { 'content-type': registry.contentType }).end(text),
        (err) => {
          logger.error({ err }, 'metrics collection failed');
          res.writeHead(500).end('metrics unavailable\n');
        },
      );
      return;
    }
    res.writeHead(404).end('not found: try /status or /metrics\n');
  });
  server.headersTimeout = 10_000;
  server.requestTimeout = 10_000;
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen({ host, port, exclusive: true }, () => {
      server.off('error', reject);
      resolve();
    });
  });
  return {
    address: server.address() as AddressInfo,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}
