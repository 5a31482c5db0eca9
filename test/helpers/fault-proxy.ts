/**
 * A small fault-injecting TCP proxy for link tests: it forwards 127.0.0.1:listen → target and can
 * delay traffic, blackhole it (accept and drop bytes silently), cut every connection after N
 * bytes, or reset connections, on command.
 */
import net from 'node:net';

export type ProxyMode =
  | { kind: 'pass' }
  | { kind: 'delay'; ms: number }
  | { kind: 'blackhole' }
  | { kind: 'cutAfter'; bytes: number }
  | { kind: 'refuse' };

export class FaultProxy {
  private readonly server: net.Server;
  private readonly pairs = new Set<[net.Socket, net.Socket]>();
  private mode: ProxyMode = { kind: 'pass' };
  port = 0;
  /** Bytes forwarded in each direction since the proxy started. */
  forwarded = { up: 0, down: 0 };

  constructor(private readonly target: { host: string; port: number }) {
    this.server = net.createServer((client) => this.accept(client));
  }

  async start(): Promise<number> {
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', () => resolve()));
    this.port = (this.server.address() as net.AddressInfo).port;
    return this.port;
  }

  setMode(mode: ProxyMode): void {
    this.mode = mode;
    if (mode.kind === 'refuse') this.resetAll();
  }

  /** Resets every open connection (RST where the platform allows it). */
  resetAll(): void {
    for (const [a, b] of this.pairs) {
      a.resetAndDestroy();
      b.resetAndDestroy();
    }
    this.pairs.clear();
  }

  async stop(): Promise<void> {
    this.resetAll();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private accept(client: net.Socket): void {
    client.on('error', () => {});
    if (this.mode.kind === 'refuse') {
      client.resetAndDestroy();
      return;
    }
    const upstream = net.connect(this.target);
    upstream.on('error', () => {});
    const pair: [net.Socket, net.Socket] = [client, upstream];
    this.pairs.add(pair);
    let carried = 0;
    const forward = (from: net.Socket, to: net.Socket, direction: 'up' | 'down') => {
      from.on('data', (chunk: Buffer) => {
        const mode = this.mode;
        if (mode.kind === 'blackhole' || mode.kind === 'refuse') return;
        if (mode.kind === 'cutAfter') {
          const room = mode.bytes - carried;
          if (room <= 0) return this.cut(pair);
          if (chunk.length > room) {
            to.write(chunk.subarray(0, room));
            carried += room;
            this.forwarded[direction] += room;
            return this.cut(pair);
          }
        }
        carried += chunk.length;
        this.forwarded[direction] += chunk.length;
        if (mode.kind === 'delay') setTimeout(() => to.destroyed || to.write(chunk), mode.ms);
        else to.write(chunk);
      });
      from.on('close', () => {
        to.destroy();
        this.pairs.delete(pair);
      });
    };
    forward(client, upstream, 'up');
    forward(upstream, client, 'down');
  }

  private cut(pair: [net.Socket, net.Socket]): void {
    pair[0].destroy();
    pair[1].destroy();
    this.pairs.delete(pair);
  }
}
