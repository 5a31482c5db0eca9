/**
 * `volrep demo`: a self-contained run of the main job on an embedded default. It creates a volume
 * in a temporary directory, serves it over NBD on 127.0.0.1, writes a workload through NBD with
 * volrep's own client, and checks that what reads back and what is on disk match what was written.
 */
import { createHash, randomBytes } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';
import { startPrimary } from '../daemon/primary.js';
import { NbdClient } from '../nbd/client.js';
import { VolrepError } from '../util/errors.js';
import { formatSize, parseSize } from '../util/size.js';
import { createVolume } from '../volume/volume.js';

export interface DemoFlags {
  size: string;
  keep: boolean;
}

const WRITE_COUNT = 2000;
const QUEUE_DEPTH = 16;

export async function runDemo(flags: DemoFlags): Promise<void> {
  const size = parseSize(flags.size, '--size');
  if (size < 16 * 1024 * 1024)
    throw new VolrepError('VOLREP_ERR_SIZE', '--size must be at least 16M for the demo');
  const say = (line: string) => process.stdout.write(`${line}\n`);
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'volrep-demo-'));
  const volumePath = path.join(dir, 'primary.img');
  try {
    const meta = await createVolume({ volumePath, size });
    say(
      `created ${volumePath}: ${formatSize(size)}, regions of ${formatSize(meta.regionSize)}, id ${meta.volumeId}`,
    );
    const primary = await startPrimary({
      volumePath,
      nbd: { host: '127.0.0.1', port: 0 },
      exportName: 'volrep',
      logger: pino({ level: 'warn' }, pino.destination({ fd: 2, sync: true })),
    });
    say(`serving it over NBD at nbd://${primary.nbdAddress}/volrep`);
    const [host, port] = splitAddress(primary.nbdAddress);
    const client = await NbdClient.connect(host, port, 'volrep');

    // The expected content, kept in memory: the volume starts all zero.
    const expected = Buffer.alloc(size);
    const started = performance.now();
    let bytes = 0;
    // Each worker writes in a stripe of its own, so no two requests in flight overlap and the
    // expected content does not depend on the order in which concurrent requests complete.
    const stripe = Math.floor(size / QUEUE_DEPTH / 4096) * 4096;
    const worker = async (w: number) => {
      for (let i = w; i < WRITE_COUNT; i += QUEUE_DEPTH) {
        const length = 4096 * (1 + (i % 16));
        const offset = w * stripe + Math.floor(Math.random() * ((stripe - length) / 4096)) * 4096;
        if (i % 50 === 49) {
          await client.writeZeroes(offset, length);
          expected.fill(0, offset, offset + length);
        } else {
          const data = randomBytes(length);
          data.copy(expected, offset);
          await client.write(offset, data);
        }
        bytes += length;
      }
    };
    await Promise.all(Array.from({ length: QUEUE_DEPTH }, (_, w) => worker(w)));
    await client.flush();
    const seconds = (performance.now() - started) / 1000;
    say(
      `wrote ${WRITE_COUNT} requests (${formatSize(Math.round(bytes / 1024) * 1024)}) at queue depth ${QUEUE_DEPTH} in ${seconds.toFixed(2)} s, flushed`,
    );

    const readBack = Buffer.alloc(size);
    for (let at = 0; at < size; at += 4 * 1024 * 1024) {
      const n = Math.min(4 * 1024 * 1024, size - at);
      (await client.read(at, n)).copy(readBack, at);
    }
    await client.close();
    await primary.close();

    const want = sha256(expected);
    const viaNbd = sha256(readBack);
    const onDisk = sha256(await fsp.readFile(volumePath));
    say(`sha256 expected   ${want}`);
    say(`sha256 read (NBD) ${viaNbd}`);
    say(`sha256 on disk    ${onDisk}`);
    if (want !== viaNbd || want !== onDisk)
      throw new Error('demo FAILED: the volume does not hold what was written');
    say('demo OK: every byte read back matches what was written');
  } finally {
    if (flags.keep) say(`kept ${dir}`);
    else await fsp.rm(dir, { recursive: true, force: true });
  }
}

function sha256(buf: Buffer): string {
  return createHash('sha256').update(buf).digest('hex');
}

function splitAddress(address: string): [string, number] {
  const at = address.lastIndexOf(':');
  return [address.slice(0, at).replace(/^\[|\]$/g, ''), Number(address.slice(at + 1))];
}
