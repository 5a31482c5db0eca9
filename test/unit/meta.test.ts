import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import fc from 'fast-check';
import { EXIT_USAGE, VolrepError } from '../../src/errors.js';
import {
  META_FILE,
  META_FORMAT_VERSION,
  type Meta,
  newMeta,
  readMeta,
  validateMeta,
  writeFileAtomic,
  writeMeta,
} from '../../src/volume/meta.js';
import * as volumeModule from '../../src/volume/volume.js';
import { BITMAP_FILE, createVolume, LOG_FILE, PAIR_STATE_FILE } from '../../src/volume/volume.js';

interface OpenVolume {
  size: number;
  meta: Meta;
  close(): Promise<void>;
}
interface VolumeClass {
  open(volumePath: string, opts?: { metaDir?: string; readOnly?: boolean }): Promise<OpenVolume>;
}
// src/volume/volume.ts is being edited concurrently and its class is being renamed from Volume to
// VolumeFile; accept either name so this test checks behaviour, not the name.
const volumeExports = volumeModule as unknown as Record<string, VolumeClass | undefined>;
const Volume = (volumeExports.Volume ?? volumeExports.VolumeFile) as VolumeClass;

const seedParams = (numRuns: number) => ({
  seed: process.env.VOLREP_SEED ? Number(process.env.VOLREP_SEED) : undefined,
  numRuns,
  includeErrorInReport: true,
});

const MiB = 1024 * 1024;
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

let root: string;
let counter = 0;

/** A fresh directory under the suite's temp root. */
function freshDir(): string {
  const dir = path.join(root, `case-${++counter}`);
  fs.mkdirSync(dir);
  return dir;
}

/** Asserts `fn` rejects with a VolrepError of `code` whose message matches every pattern. */
async function rejectsWith(
  fn: () => Promise<unknown>,
  code: string,
  ...patterns: RegExp[]
): Promise<VolrepError> {
  let caught: unknown;
  try {
    await fn();
  } catch (err) {
    caught = err;
  }
  assert.ok(caught instanceof VolrepError, `expected a VolrepError ${code}, got ${String(caught)}`);
  assert.equal(caught.code, code, caught.message);
  for (const p of patterns) assert.match(caught.message, p);
  assert.equal(caught.exitCode, EXIT_USAGE);
  return caught;
}

function validMeta(): Meta {
  return newMeta({ size: MiB, regionSize: 64 * 1024, logSize: 64 * 1024 });
}

/** Writes raw text as meta.json in a fresh metadata directory and returns the directory. */
function metaDirWith(text: string): string {
  const dir = freshDir();
  fs.writeFileSync(path.join(dir, META_FILE), text);
  return dir;
}

function metaDirWithObject(obj: unknown): string {
  return metaDirWith(JSON.stringify(obj));
}

describe('meta.json', () => {
  before(() => {
    root = fs.mkdtempSync(path.join(os.tmpdir(), 'volrep-meta-'));
  });
  after(() => {
    fs.rmSync(root, { recursive: true, force: true });
  });

  it('round-trips: createVolume then readMeta gives the same metadata', async () => {
    const dir = freshDir();
    const volumePath = path.join(dir, 'disk.img');
    const created = await createVolume({ volumePath, size: 3 * MiB, regionSize: 4096, logSize: 128 * 1024 });
    assert.equal(created.formatVersion, META_FORMAT_VERSION);
    assert.match(created.volumeId, UUID);
    assert.equal(created.size, 3 * MiB);
    assert.equal(created.regionSize, 4096);
    assert.equal(created.logSize, 128 * 1024);
    assert.equal(created.role, 'primary');
    assert.equal(new Date(created.createdAt).toISOString(), created.createdAt);

    const metaDir = `${volumePath}.volrep`;
    assert.deepEqual(await readMeta(metaDir), created);
    // Scripts read these keys straight from the file.
    const onDisk = JSON.parse(fs.readFileSync(path.join(metaDir, META_FILE), 'utf8'));
    assert.deepEqual(Object.keys(onDisk).sort(), [
      'createdAt',
      'formatVersion',
      'logSize',
      'regionSize',
      'role',
      'size',
      'volumeId',
    ]);
    assert.equal(fs.statSync(volumePath).size, 3 * MiB);
    assert.equal(fs.statSync(path.join(metaDir, LOG_FILE)).size, 128 * 1024);
    assert.ok(fs.statSync(path.join(metaDir, BITMAP_FILE)).size > 0);
    // Nothing else in the metadata directory: no temp files left behind.
    assert.deepEqual(
      fs.readdirSync(metaDir).sort(),
      [BITMAP_FILE, 'identity.crt', 'identity.key', LOG_FILE, META_FILE, PAIR_STATE_FILE].sort(),
    );

    const volume = await Volume.open(volumePath);
    try {
      assert.equal(volume.size, 3 * MiB);
      assert.deepEqual(volume.meta, created);
    } finally {
      await volume.close();
    }
    assert.deepEqual(
      fs.readdirSync(metaDir).sort(),
      [BITMAP_FILE, 'identity.crt', 'identity.key', LOG_FILE, META_FILE, PAIR_STATE_FILE].sort(),
    );
  });

  it('round-trips through writeMeta/readMeta for any valid metadata', async () => {
    const dir = freshDir();
    await fc.assert(
      fc.asyncProperty(
        fc.record({
          size: fc.integer({ min: 1, max: Number.MAX_SAFE_INTEGER }),
          regionShift: fc.integer({ min: 12, max: 24 }),
          logSize: fc.integer({ min: 1, max: 2 ** 40 }),
          role: fc.constantFrom('primary' as const, 'secondary' as const),
          volumeId: fc.uuid(),
        }),
        async (f) => {
          const meta = newMeta({ ...f, regionSize: 2 ** f.regionShift, volumeId: f.volumeId.toLowerCase() });
          await writeMeta(dir, meta);
          assert.deepEqual(await readMeta(dir), meta);
          assert.deepEqual(fs.readdirSync(dir), [META_FILE]);
        },
      ),
      seedParams(50),
    );
  });

  it('refuses to open a volume whose size differs from its metadata (VOLREP_ERR_VOLUME_SIZE)', async () => {
    const dir = freshDir();
    const volumePath = path.join(dir, 'disk.img');
    await createVolume({ volumePath, size: MiB, logSize: 64 * 1024 });
    for (const size of [MiB - 512, MiB + 4096, 0]) {
      fs.truncateSync(volumePath, size);
      await rejectsWith(
        () => Volume.open(volumePath),
        'VOLREP_ERR_VOLUME_SIZE',
        new RegExp(`${size}`),
        /1048576/,
      );
      // The refusal does not leave the volume locked.
      assert.ok(!fs.existsSync(path.join(`${volumePath}.volrep`, 'lock')));
    }
    fs.truncateSync(volumePath, MiB);
    const volume = await Volume.open(volumePath);
    await volume.close();
  });

  it('refuses to adopt an existing file of another size (VOLREP_ERR_VOLUME_SIZE)', async () => {
    const dir = freshDir();
    const volumePath = path.join(dir, 'disk.img');
    fs.writeFileSync(volumePath, Buffer.alloc(4096));
    await rejectsWith(() => createVolume({ volumePath, size: MiB }), 'VOLREP_ERR_VOLUME_SIZE', /4096/);
    assert.ok(!fs.existsSync(`${volumePath}.volrep`), 'metadata written for a refused volume');
  });

  it('refuses a newer formatVersion (VOLREP_ERR_META_VERSION) and says to upgrade', async () => {
    for (const version of [META_FORMAT_VERSION + 1, 99]) {
      const dir = metaDirWithObject({ ...validMeta(), formatVersion: version });
      await rejectsWith(() => readMeta(dir), 'VOLREP_ERR_META_VERSION', /upgrad/i, new RegExp(`${version}`));
    }
    // Also through Volume.open.
    const dir = freshDir();
    const volumePath = path.join(dir, 'disk.img');
    await createVolume({ volumePath, size: MiB, logSize: 64 * 1024 });
    const file = path.join(`${volumePath}.volrep`, META_FILE);
    const meta = JSON.parse(fs.readFileSync(file, 'utf8'));
    fs.writeFileSync(file, JSON.stringify({ ...meta, formatVersion: 2 }));
    await rejectsWith(() => Volume.open(volumePath), 'VOLREP_ERR_META_VERSION', /upgrad/i);
  });

  it('refuses corrupt JSON (VOLREP_ERR_META)', async () => {
    const good = JSON.stringify(validMeta());
    for (const text of [
      '',
      '{',
      good.slice(0, -1),
      `${good}}`,
      'not json',
      '\u0000\u0001',
      '{"formatVersion":1,}',
    ]) {
      await rejectsWith(() => readMeta(metaDirWith(text)), 'VOLREP_ERR_META', /corrupt/, /meta\.json/);
    }
    for (const text of ['[]', 'null', '42', '"meta"', 'true']) {
      await rejectsWith(() => readMeta(metaDirWith(text)), 'VOLREP_ERR_META', /not a JSON object/);
    }
  });

  it('refuses metadata with a missing field, naming the field (VOLREP_ERR_META)', async () => {
    const meta = validMeta();
    for (const key of Object.keys(meta) as (keyof Meta)[]) {
      const obj: Record<string, unknown> = { ...meta };
      delete obj[key];
      await rejectsWith(() => readMeta(metaDirWithObject(obj)), 'VOLREP_ERR_META', new RegExp(key));
    }
  });

  it('refuses fields of the wrong type, naming the field (VOLREP_ERR_META)', async () => {
    const meta = validMeta();
    const cases: [keyof Meta, unknown][] = [
      ['formatVersion', '1'],
      ['formatVersion', 1.5],
      ['formatVersion', null],
      ['formatVersion', 0],
      ['volumeId', 123],
      ['size', '1048576'],
      ['size', 0],
      ['size', -512],
      ['size', 1.5],
      ['size', 2 ** 60],
      ['regionSize', '65536'],
      ['regionSize', 65536.5],
      ['logSize', -1],
      ['logSize', '64K'],
      ['logSize', null],
      ['role', 'tertiary'],
      ['role', 1],
      ['createdAt', 5],
      ['createdAt', null],
    ];
    for (const [key, value] of cases) {
      const dir = metaDirWithObject({ ...meta, [key]: value });
      await rejectsWith(() => readMeta(dir), 'VOLREP_ERR_META', new RegExp(key));
    }
  });

  it('refuses a volumeId that is not a UUID', async () => {
    for (const id of [
      '',
      'not-a-uuid',
      '12345678123412341234123456789abc',
      '12345678-1234-1234-1234-1234567890ab0',
      'g2345678-1234-1234-1234-1234567890ab',
    ]) {
      await rejectsWith(
        () => readMeta(metaDirWithObject({ ...validMeta(), volumeId: id })),
        'VOLREP_ERR_META',
        /volumeId is not a UUID/,
      );
    }
  });

  it('refuses a regionSize that is not a power of two or out of range', async () => {
    for (const regionSize of [65535, 3 * 4096, 4097, 0, -4096]) {
      await rejectsWith(
        () => readMeta(metaDirWithObject({ ...validMeta(), regionSize })),
        'VOLREP_ERR_META',
        /regionSize is not a power of two/,
      );
    }
    for (const regionSize of [2048, 32 * MiB, 1]) {
      await rejectsWith(
        () => readMeta(metaDirWithObject({ ...validMeta(), regionSize })),
        'VOLREP_ERR_META',
        /regionSize/,
      );
    }
  });

  it('refuses an oversize meta.json without parsing it', async () => {
    // Valid JSON, padded past the 64 KiB limit.
    const text = JSON.stringify(validMeta()).padEnd(64 * 1024 + 1, ' ');
    JSON.parse(text);
    await rejectsWith(() => readMeta(metaDirWith(text)), 'VOLREP_ERR_META', /too large/);
    // Just under the limit is fine.
    const ok = JSON.stringify(validMeta()).padEnd(64 * 1024, ' ');
    assert.equal((await readMeta(metaDirWith(ok))).size, MiB);
  });

  it('says what to do when meta.json is missing (VOLREP_ERR_NOT_FOUND)', async () => {
    await rejectsWith(() => readMeta(freshDir()), 'VOLREP_ERR_NOT_FOUND', /volrep create/);
  });

  it('refuses to replace existing metadata without force (VOLREP_ERR_EXISTS), replaces it with force', async () => {
    const dir = freshDir();
    const volumePath = path.join(dir, 'disk.img');
    const first = await createVolume({ volumePath, size: MiB, logSize: 64 * 1024 });
    const metaFile = path.join(`${volumePath}.volrep`, META_FILE);
    const before = fs.readFileSync(metaFile, 'utf8');
    await rejectsWith(
      () => createVolume({ volumePath, size: MiB, logSize: 64 * 1024 }),
      'VOLREP_ERR_EXISTS',
      /--force/,
    );
    assert.equal(fs.readFileSync(metaFile, 'utf8'), before, 'refused create changed meta.json');
    const second = await createVolume({ volumePath, size: MiB, logSize: 64 * 1024, force: true });
    assert.notEqual(second.volumeId, first.volumeId);
    assert.deepEqual(await readMeta(`${volumePath}.volrep`), second);
  });

  it('writeFileAtomic replaces content and leaves no temp files', async () => {
    const dir = freshDir();
    const file = path.join(dir, 'x.json');
    await writeFileAtomic(file, 'one');
    assert.equal(fs.readFileSync(file, 'utf8'), 'one');
    await writeFileAtomic(file, new Uint8Array([116, 119, 111]));
    assert.equal(fs.readFileSync(file, 'utf8'), 'two');
    await Promise.all([writeFileAtomic(path.join(dir, 'a'), 'a'), writeFileAtomic(path.join(dir, 'b'), 'b')]);
    assert.deepEqual(fs.readdirSync(dir).sort(), ['a', 'b', 'x.json']);
  });

  it('writeFileAtomic leaves no temp file when it fails', async () => {
    const dir = freshDir();
    // The target is a non-empty directory: the final rename fails.
    const file = path.join(dir, 'meta.json');
    fs.mkdirSync(file);
    fs.writeFileSync(path.join(file, 'inside'), 'x');
    await assert.rejects(writeFileAtomic(file, 'data'));
    assert.deepEqual(fs.readdirSync(dir), ['meta.json'], 'temp file left behind after a failed write');
  });

  it('writeFileAtomic calls on the same file from one process do not collide', async () => {
    const dir = freshDir();
    const file = path.join(dir, 'meta.json');
    const big = 'a'.repeat(100_000);
    await Promise.all([writeFileAtomic(file, big), writeFileAtomic(file, 'bb')]);
    const content = fs.readFileSync(file, 'utf8');
    assert.ok(content === big || content === 'bb', `torn content of ${content.length} bytes`);
    assert.deepEqual(fs.readdirSync(dir), ['meta.json']);
  });

  it('validateMeta never throws anything but a VolrepError on arbitrary JSON', () => {
    const good = validMeta() as unknown as Record<string, unknown>;
    fc.assert(
      fc.property(
        fc.oneof(
          fc.jsonValue(),
          fc
            .tuple(fc.constantFrom(...Object.keys(good)), fc.jsonValue())
            .map(([key, value]) => ({ ...good, [key]: value })),
        ),
        (value) => {
          try {
            const meta = validateMeta(value, 'meta.json');
            // Accepted: then it really is well-formed.
            assert.match(meta.volumeId, UUID);
            assert.ok(Number.isSafeInteger(meta.size) && meta.size > 0);
            assert.equal(meta.regionSize & (meta.regionSize - 1), 0);
          } catch (err) {
            assert.ok(err instanceof VolrepError, `threw ${String(err)}`);
            assert.ok(err.code === 'VOLREP_ERR_META' || err.code === 'VOLREP_ERR_META_VERSION', err.code);
            assert.match(err.message, /^meta\.json: /);
          }
        },
      ),
      seedParams(2000),
    );
  });
});
