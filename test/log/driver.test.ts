import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';
import type { WriteKind } from '../../src/core/engine.js';
import { type Chunks, ReplicationDriver, type UpdateSink, type VolumeIo } from '../../src/log/driver.js';

const KiB = 1024;
const VOLUME_BYTES = 256 * KiB;

/** A volume in memory (writes durable at once for this test). */
class MemVolume implements VolumeIo {
  bytes = new Uint8Array(VOLUME_BYTES);
  syncs = 0;
  async write(offset: number, length: number, _kind: WriteKind, data: Chunks | null): Promise<void> {
    if (data === null) this.bytes.set(new Uint8Array(length), offset);
    else this.bytes.set(Buffer.concat(data), offset);
  }
  async read(offset: number, length: number): Promise<Uint8Array> {
    return this.bytes.slice(offset, offset + length);
  }
  async sync(): Promise<void> {
    this.syncs += 1;
  }
}

/** A secondary in the same process: applies updates in order and acks each one. */
class Replica implements UpdateSink {
  bytes = new Uint8Array(VOLUME_BYTES);
  lastApplied = 0;
  barriers = 0;
  driver: ReplicationDriver | null = null;
  send(u: { updateId: number; offset: number; length: number; data: Chunks | null }): void {
    assert.ok(u.updateId > this.lastApplied);
    this.bytes.set(u.data === null ? new Uint8Array(u.length) : Buffer.concat(u.data), u.offset);
    this.lastApplied = u.updateId;
    queueMicrotask(() => this.driver?.ack(u.updateId));
  }
  sendBarrier(): void {
    this.barriers += 1;
  }
  disconnect(): void {
    queueMicrotask(() => this.driver?.disconnected());
  }
}

describe('ReplicationDriver on real files', () => {
  let dir = '';
  after(async () => {
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('replicates writes, survives a restart, and resyncs what a disconnect left dirty', async () => {
    dir = await mkdtemp(join(tmpdir(), 'volrep-driver-'));
    const config = {
      volumeSize: VOLUME_BYTES,
      regionSize: 4 * KiB,
      logFileBytes: 8192 + 64 * KiB,
      activityWindowRegions: 8,
      inflightBytesMax: 64 * KiB,
      ackTimeoutMs: 10_000,
    };
    const volume = new MemVolume();
    const replica = new Replica();
    let driver = await ReplicationDriver.open(dir, config, volume, replica);
    replica.driver = driver;
    driver.connected(0);
    const data = new Uint8Array(6000).fill(7);
    await driver.write([{ offset: 1000, kind: 'data', data }]);
    await driver.write([{ offset: 50 * KiB, kind: 'zero', length: 100 }]);
    driver.barrier();
    await new Promise((r) => setTimeout(r, 20));
    assert.ok(Buffer.compare(replica.bytes, volume.bytes) === 0, 'replica equals volume');
    assert.equal(replica.barriers, 1);

    // Writes while the secondary is away stay dirty across a restart of the primary.
    driver.disconnected();
    await driver.write([{ offset: 100 * KiB, kind: 'data', data: new Uint8Array(10).fill(9) }]);
    await driver.close();
    driver = await ReplicationDriver.open(dir, config, volume, replica);
    replica.driver = driver;
    assert.ok(driver.engine.indicator.test(25), 'region 25 is dirty after the restart');
    driver.connected(replica.lastApplied);
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(driver.engine.indicator.count, 0);
    assert.ok(Buffer.compare(replica.bytes, volume.bytes) === 0, 'replica equals volume after the resync');
    await driver.close();
  });
});
