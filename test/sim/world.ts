/**
 * The simulated pair: the real primary node (engine core, log, bitmap, pair state, session) and
 * the real secondary node (session, applier, replica state) over simulated disks, a simulated
 * network and a simulated clock, driven by one seed. Each step does one thing — complete an I/O,
 * deliver bytes, let time pass, submit a client request, let the kernel write a page back, or
 * inject a fault (kill or power-loss either node, reset a connection, partition the link) —
 * and then every invariant is checked (checks.ts). At the end every fault heals, the pair must
 * converge, and the replica must be byte-identical to the primary.
 */
import { crc32c } from '@node-rs/crc32';
import type { WriteKind } from '../../src/core/engine.js';
import { ChunkQueue } from '../../src/io/chunk-queue.js';
import { SLOT_FILE_BYTES, SlotFile } from '../../src/io/slot-file.js';
import { BitmapFile } from '../../src/log/bitmap-file.js';
import { LogFile } from '../../src/log/log-file.js';
import type { ReplicaState } from '../../src/replication/applier.js';
import { FrameDecoder } from '../../src/replication/frames.js';
import { decodeMessage } from '../../src/replication/messages.js';
import type { PairState } from '../../src/replication/primary-session.js';
import {
  type NodeLogger,
  PrimaryNode,
  type PrimaryNodeConfig,
  type PrimaryNodeStatus,
} from '../../src/shell/primary-node.js';
import { INITIAL_REPLICA_STATE, SecondaryNode } from '../../src/shell/secondary-node.js';
import type { BornZeroMark } from '../../src/volume/born-zero.js';
import { Checks } from './checks.js';
import { Prng } from './prng.js';
import { SimDisk } from './sim-disk.js';
import { IoQueue, type NodeName, SimDevice, type SimEnd, SimFile, SimNetwork, SimTime } from './sim-io.js';
import { SECTOR_BYTES, Workload } from './workload.js';

export type FailureKind = 'correctness' | 'liveness' | 'crash';

/** A run that broke a rule: `kind` picks the exit code; the message says what and where. */
export class SimFailure extends Error {
  constructor(
    readonly kind: FailureKind,
    message: string,
  ) {
    super(message);
  }
}

export const SIM_VOLUME_ID = '00000000-0000-4000-8000-000000000001';
/** The mark `volrep create` leaves on a volume file it made; nothing outside volrep writes here. */
export const SIM_BORN_ZERO: BornZeroMark = { ino: '1', ctimeNs: '1', size: 1 };
const asCreated = () => true;
const REGION_BYTES = 4096;
/** 24.5 regions: a partial last region. */
const VOLUME_BYTES = 24 * REGION_BYTES + 2048;
const CONVERGE_STEPS_MAX = 60_000;

/**
 * What one seed's world is like, drawn from the seed: how hard the client pushes, how often things
 * break, how slow the secondary's disk is, how bursty the network. Different regimes find
 * different bugs (a deep queue and big transactions fill a small log; a slow secondary with
 * bursts lets updates on both sides of a barrier meet in one batch).
 */
export interface Profile {
  queueDepth: number;
  /** Share of requests that are a FLUSH. */
  flushShare: number;
  /** Chance that a write (or transaction) is FUA. */
  fuaChance: number;
  /** Writes per library transaction, at most (also the engine's limit). */
  txWritesMax: number;
  /** Weight of a fault among the step kinds. */
  faultWeight: number;
  /** Weight of completing a secondary I/O relative to a primary one. */
  secondaryIoSpeed: number;
  /** Chance that a delivery step delivers everything queued for an end. */
  burstChance: number;
  /** Chance per step that a busy client pauses (a pause lets resyncs finish: I5 needs a consistent replica). */
  pauseChance: number;
}
const TRACE_LINES = 120;

export interface SimOptions {
  seed: number;
  steps: number;
  /** Scripted tests pin what the seed would draw. */
  syncMode?: boolean;
  assumeClean?: boolean;
  profile?: Partial<Profile>;
}

/** Counts of what a run exercised. */
export interface SimStats {
  steps: number;
  requests: number;
  ioCompleted: number;
  kills: number;
  powerLosses: number;
  linkFaults: number;
  writebacks: number;
  reconnects: number;
}

interface Slot<T> {
  node: T | undefined;
  state: 'down' | 'starting' | 'up';
  incarnation: number;
  downSinceMs: number;
}

export class World {
  readonly prng: Prng;
  readonly time = new SimTime();
  readonly io = new IoQueue();
  readonly net = new SimNetwork();
  readonly config: PrimaryNodeConfig;
  readonly regionCount: number;
  readonly syncMode: boolean;
  readonly assumeClean: boolean;
  /** Without --assume-clean: `volrep create` made both volumes (the first sync sends what was written). */
  readonly bornZero: boolean;
  readonly profile: Profile;
  // The primary's disks.
  readonly volume = new SimDisk(VOLUME_BYTES, {
    atomicBytes: SECTOR_BYTES,
    modes: ['whole', 'absent', 'partial'],
  });
  readonly logDisk: SimDisk;
  readonly bitmapDisk: SimDisk;
  readonly pairDisk = new SimDisk(SLOT_FILE_BYTES);
  // The secondary's disks.
  readonly replica = new SimDisk(VOLUME_BYTES, {
    atomicBytes: SECTOR_BYTES,
    modes: ['whole', 'absent', 'partial'],
  });
  readonly stateDisk = new SimDisk(SLOT_FILE_BYTES);
  /** The secondary's own log and bitmap (what it wrote as a primary: nothing, until roles change). */
  readonly secLogDisk = new SimDisk(LogFile.fileBytes(64 * 1024));
  readonly secBitmapDisk: SimDisk;
  /** Generation ids: a counter, so the workload's random stream is the same as without them. */
  private generationIds = 0;
  readonly newGenerationId = () => (++this.generationIds).toString(16).padStart(16, '0');
  readonly primary: Slot<PrimaryNode> = { node: undefined, state: 'down', incarnation: 0, downSinceMs: 0 };
  readonly secondary: Slot<SecondaryNode> = {
    node: undefined,
    state: 'down',
    incarnation: 0,
    downSinceMs: 0,
  };
  readonly workload: Workload;
  readonly checks: Checks;
  readonly stats: SimStats = {
    steps: 0,
    requests: 0,
    ioCompleted: 0,
    kills: 0,
    powerLosses: 0,
    linkFaults: 0,
    writebacks: 0,
    reconnects: 0,
  };
  step = 0;
  private clientBusy = true;
  /** The first broken rule seen in a callback (node failure, client error): thrown at the next check. */
  failure: SimFailure | undefined;
  private readonly traceLines: string[] = [];
  private readonly logger: NodeLogger;
  /** Updates the primary sent, in id order (sniffed from its stream). */
  readonly sentUpdates: Array<{ id: number; offset: number; length: number }> = [];
  /** The highest id the primary took as durable on the replica (an ack or a welcome). */
  maxAckSeen = 0;
  /** Update ids the secondary wrote to the replica, in order, and which of them are durable. */
  readonly writtenIds: number[] = [];
  readonly durableIds = new Set<number>();
  /** Per end and direction (an end's bytes out and in are two streams). */
  private readonly sniffers = {
    sent: new Map<SimEnd, { queue: ChunkQueue; decoder: FrameDecoder }>(),
    delivered: new Map<SimEnd, { queue: ChunkQueue; decoder: FrameDecoder }>(),
  };

  constructor(readonly options: SimOptions) {
    this.prng = new Prng(options.seed);
    const p = this.prng;
    this.regionCount = Math.ceil(VOLUME_BYTES / REGION_BYTES);
    this.syncMode = options.syncMode ?? options.seed % 3 === 0;
    this.assumeClean = p.chance(0.5);
    if (options.assumeClean !== undefined) this.assumeClean = options.assumeClean;
    // From the seed, not the prng: the other draws of a seed stay as they were.
    this.bornZero = !this.assumeClean && options.seed % 4 >= 2;
    this.profile = {
      queueDepth: p.pick([2, 4, 8, 16]),
      flushShare: p.pick([0.02, 0.1, 0.25]),
      fuaChance: p.pick([0.05, 0.2, 0.4]),
      txWritesMax: p.pick([1, 3, 8]),
      faultWeight: p.pick([0.1, 0.4, 1.2]),
      secondaryIoSpeed: p.pick([1, 1, 0.2]),
      burstChance: p.pick([0, 0.3]),
      pauseChance: p.pick([0, 0.02, 0.05]),
      ...options.profile,
    };
    const logCapacity = p.pick([1024, 1024, 2048]);
    this.logDisk = new SimDisk(LogFile.fileBytes(Math.ceil(logCapacity / 8) * 8));
    this.bitmapDisk = new SimDisk(BitmapFile.fileBytes(this.regionCount));
    this.secBitmapDisk = new SimDisk(BitmapFile.fileBytes(this.regionCount));
    this.config = {
      volumeSize: VOLUME_BYTES,
      regionSize: REGION_BYTES,
      activityWindowRegions: p.pick([2, 6, 16]),
      inflightBytesMax: 24 * 1024,
      ackTimeoutMs: 500,
      txWritesMax: this.profile.txWritesMax,
      syncMode: this.syncMode,
    };
    this.logger = {
      debug: () => {},
      info: (fields, msg) => this.trace(`  log: ${msg} ${brief(fields)}`),
      warn: (fields, msg) => this.trace(`  log: ${msg} ${brief(fields)}`),
      error: (fields, msg) => this.trace(`  log: ERROR ${msg} ${brief(fields)}`),
    };
    this.workload = new Workload(VOLUME_BYTES, REGION_BYTES, this.syncMode, this.profile, (line) =>
      this.trace(line),
    );
    this.checks = new Checks(this);
    this.net.trace = (line) => this.trace(`  net: ${line}`);
    this.net.onSend = (from, chunk) => {
      this.sniff(from, 'sent', chunk);
    };
    this.net.onDeliver = (to, chunk) => {
      if (to.node === 'primary') this.sniff(to, 'delivered', chunk);
    };
    this.replica.onWritten = (id) => this.writtenIds.push(id);
    this.replica.onDurable = (id) => this.durableIds.add(id);
  }

  /** `volrep create` on both sides: formatted metadata, zeroed volumes. */
  async format(): Promise<void> {
    await LogFile.format(this.logDisk);
    await BitmapFile.format(this.bitmapDisk, this.regionCount);
    await SlotFile.format(this.pairDisk, {
      replicaEverSynced: false,
      generations: { current: this.newGenerationId(), base: null, history: [], resync: null },
      ...(this.bornZero && { volumeBornZero: SIM_BORN_ZERO }),
    } satisfies PairState);
    await SlotFile.format(this.stateDisk, {
      ...INITIAL_REPLICA_STATE,
      ...(this.bornZero && { bornZero: SIM_BORN_ZERO }),
    } satisfies ReplicaState);
    await LogFile.format(this.secLogDisk);
    await BitmapFile.format(this.secBitmapDisk, this.regionCount);
    for (const d of [
      this.logDisk,
      this.bitmapDisk,
      this.pairDisk,
      this.stateDisk,
      this.secLogDisk,
      this.secBitmapDisk,
      this.volume,
      this.replica,
    ])
      d.syncSync();
  }

  describe(): string {
    return `seed ${this.options.seed}: ${this.syncMode ? 'sync' : 'async'} mode, ${this.assumeClean ? '--assume-clean' : this.bornZero ? 'both volumes born zero' : 'full initial sync'}, log ${this.logDisk.size - LogFile.fileBytes(0)} B, window ${this.config.activityWindowRegions} regions, ${JSON.stringify(this.profile)}`;
  }

  trace(line: string): void {
    if (process.env.VOLREP_SIM_TRACE) process.stderr.write(`${String(this.step).padStart(5)} ${line}\n`);
    this.traceLines.push(
      `${String(this.step).padStart(5)} ${String(Math.round(this.time.nowMs)).padStart(6)}ms ${line}`,
    );
    if (this.traceLines.length > TRACE_LINES * 2)
      this.traceLines.splice(0, this.traceLines.length - TRACE_LINES);
  }

  recentTrace(lines = 60): string {
    return this.traceLines.slice(-lines).join('\n');
  }

  // -----------------------------------------------------------------------------------------------
  // The run

  async run(): Promise<SimStats> {
    await this.format();
    this.startSecondary();
    this.startPrimary();
    await settle();
    for (let i = 0; i < this.options.steps; i++) {
      await this.randomStep();
      await this.afterStep();
    }
    await this.converge();
    this.stats.steps = this.step;
    this.stats.requests = this.workload.submitted;
    this.stats.reconnects = this.primary.node?.status().link?.connections ?? 0;
    return this.stats;
  }

  private async afterStep(): Promise<void> {
    await settle();
    this.net.prune();
    if (this.workload.error) this.fail('crash', `a client request failed: ${this.workload.error.message}`);
    if (this.failure) throw this.failure;
    await this.checks.all();
  }

  private async randomStep(): Promise<void> {
    this.step += 1;
    const p = this.prng;
    this.advance(this.time.nowMs + p.int(1000) / 1000);
    const choices: Array<[number, () => void]> = [];
    const prof = this.profile;
    const ioPrimary = this.io.pending.some((op) => op.node === 'primary');
    const ioSecondary = this.io.pending.some((op) => op.node === 'secondary');
    if (ioPrimary) choices.push([15, () => this.completeIo('primary')]);
    if (ioSecondary) choices.push([15 * prof.secondaryIoSpeed, () => this.completeIo('secondary')]);
    const netSteps = this.net.steps(p);
    if (netSteps.length > 0) {
      choices.push([
        25,
        () => {
          if (p.chance(prof.burstChance)) for (const step of netSteps) step();
          else p.pick(netSteps)();
        },
      ]);
    }
    if (this.clientBusy ? p.chance(prof.pauseChance) : p.chance(0.04)) this.clientBusy = !this.clientBusy;
    if (this.clientBusy && this.primary.state === 'up' && this.workload.outstanding < prof.queueDepth) {
      choices.push([14, () => this.submit()]);
    }
    // Time: every step takes a little (I/O and the network take microseconds to milliseconds);
    // now and then a longer pause (a stall, a slow disk) runs up to the next timer while work is
    // pending, which is what makes timeouts fire on a live link.
    choices.push([4, () => this.advance(this.time.nowMs + 1 + p.int(20))]);
    const nextTimer = this.time.nextTimerMs();
    if (nextTimer !== Number.POSITIVE_INFINITY) {
      const idle = this.io.pending.length === 0 && netSteps.length === 0;
      choices.push([idle ? 20 : 0.4, () => this.advance(Math.max(nextTimer, this.time.nowMs))]);
    }
    choices.push([3, () => this.writeback()]);
    choices.push([prof.faultWeight, () => this.fault()]);
    for (const [slot, start] of [
      [this.primary, () => this.startPrimary()],
      [this.secondary, () => this.startSecondary()],
    ] as const) {
      if (slot.state === 'down' && this.time.nowMs - slot.downSinceMs >= 50) choices.push([6, start]);
    }
    let total = 0;
    for (const [w] of choices) total += w;
    let r = (p.next() / 2 ** 32) * total;
    for (const [w, act] of choices) {
      r -= w;
      if (r < 0) return act();
    }
    return choices[choices.length - 1][1]();
  }

  private completeIo(node?: NodeName): void {
    const op = this.io.completeOne(this.prng, node);
    if (op) {
      this.stats.ioCompleted += 1;
      if (op.kind !== 'read') this.trace(`io: ${op.node} ${op.what}`);
    }
  }

  private advance(toMs: number): void {
    const fired = this.time.advance(toMs);
    if (fired > 0) this.trace(`time: ${fired} timer(s) fired`);
  }

  private submit(): void {
    const node = this.primary.node!;
    this.workload.submit(
      node,
      this.prng,
      () => this.step,
      () => {
        const link = node.status().link;
        return link?.state === 'streaming' ? link.connections : 0;
      },
    );
  }

  private writeback(): void {
    const disks = [
      this.volume,
      this.logDisk,
      this.bitmapDisk,
      this.pairDisk,
      this.replica,
      this.stateDisk,
      this.secLogDisk,
      this.secBitmapDisk,
    ];
    const disk = this.prng.pick(disks);
    if (disk.writeback(this.prng)) {
      this.stats.writebacks += 1;
      this.trace('kernel writeback of one page');
    }
  }

  private fault(): void {
    const p = this.prng;
    const faults: Array<() => void> = [];
    if (this.primary.state !== 'down') {
      faults.push(
        () => this.killPrimary(false),
        () => this.killPrimary(true),
      );
    }
    if (this.secondary.state !== 'down') {
      faults.push(
        () => this.killSecondary(false),
        () => this.killSecondary(true),
      );
    }
    const live = this.net.connections.filter(
      (c) => !c.establishing && !c.dialer.closed && !c.acceptor.closed,
    );
    if (live.length > 0) {
      faults.push(() => {
        this.stats.linkFaults += 1;
        this.net.reset(p.pick(live));
      });
    }
    faults.push(() => {
      this.stats.linkFaults += 1;
      this.net.blackholed = !this.net.blackholed;
      this.trace(`FAULT: link ${this.net.blackholed ? 'PARTITIONED (everything held)' : 'healed'}`);
    });
    p.pick(faults)();
    // Now and then two things go wrong at once.
    if (p.chance(0.15)) p.pick(faults)();
  }

  // -----------------------------------------------------------------------------------------------
  // Nodes

  startPrimary(): void {
    const slot = this.primary;
    if (slot.state !== 'down') return;
    slot.state = 'starting';
    const incarnation = ++slot.incarnation;
    this.trace(`primary starts (incarnation ${incarnation})`);
    const storage = {
      log: new SimFile(this.io, 'primary', this.logDisk, 'log'),
      bitmap: new SimFile(this.io, 'primary', this.bitmapDisk, 'bitmap'),
      pairState: new SimFile(this.io, 'primary', this.pairDisk, 'pair-state'),
      volume: new SimDevice(this.io, 'primary', this.volume, 'volume'),
    };
    PrimaryNode.open(storage, this.config, {
      clock: this.time.clockFor('primary'),
      logger: this.logger,
      volumeAsCreated: asCreated,
      link: {
        dialer: this.net.dialer(),
        hello: { volumeId: SIM_VOLUME_ID, size: VOLUME_BYTES, regionSize: REGION_BYTES },
        assumeClean: this.assumeClean,
      },
      newGenerationId: this.newGenerationId,
      onFailure: (err) => {
        if (incarnation === slot.incarnation) this.fail('crash', `the primary failed: ${err.message}`);
      },
    }).then(
      (node) => {
        if (incarnation !== slot.incarnation) return;
        slot.node = node;
        slot.state = 'up';
        this.trace(`primary up: recovered ${JSON.stringify(node.recovery)}`);
      },
      (err: Error) => {
        if (incarnation === slot.incarnation) this.fail('crash', `the primary could not start: ${err.stack}`);
      },
    );
  }

  startSecondary(): void {
    const slot = this.secondary;
    if (slot.state !== 'down') return;
    slot.state = 'starting';
    const incarnation = ++slot.incarnation;
    this.trace(`secondary starts (incarnation ${incarnation})`);
    const replica = new SimDevice(this.io, 'secondary', this.replica, 'replica');
    SecondaryNode.open(
      {
        replica,
        state: new SimFile(this.io, 'secondary', this.stateDisk, 'replica-state'),
        log: new SimFile(this.io, 'secondary', this.secLogDisk, 'log'),
        bitmap: new SimFile(this.io, 'secondary', this.secBitmapDisk, 'bitmap'),
      },
      { volumeId: SIM_VOLUME_ID, size: VOLUME_BYTES, regionSize: REGION_BYTES },
      {
        clock: this.time.clockFor('secondary'),
        logger: this.logger,
        replicaAsCreated: asCreated,
        onFailure: (err) => {
          if (incarnation === slot.incarnation) this.fail('crash', `the secondary failed: ${err.message}`);
        },
      },
    ).then(
      (node) => {
        if (incarnation !== slot.incarnation) return;
        slot.node = node;
        slot.state = 'up';
        replica.tagWrite = () => node.applier.applyingId;
        this.net.listener = (connection) => node.accept(connection);
        this.trace(`secondary up: ${JSON.stringify(node.status())}`);
      },
      (err: Error) => {
        if (incarnation === slot.incarnation)
          this.fail('crash', `the secondary could not start: ${err.stack}`);
      },
    );
  }

  killPrimary(power: boolean): void {
    const slot = this.primary;
    this.trace(`FAULT: primary ${power ? 'POWER LOSS' : 'KILLED'}`);
    if (power) this.stats.powerLosses += 1;
    else this.stats.kills += 1;
    this.markDown(slot);
    this.io.dropNode('primary', this.prng);
    this.time.dropNode('primary');
    this.net.dropNode('primary', power, this.prng);
    this.workload.abandon();
    if (power) {
      // Sync mode's promise is about this instant: every write whose completion the client saw
      // is in the replica's durable image. The primary's own unsynced writes go now.
      this.checks.syncMode('at the primary power loss');
      for (const d of [this.volume, this.logDisk, this.bitmapDisk, this.pairDisk]) d.crash(this.prng);
      this.workload.powerLost(this.step);
    }
  }

  killSecondary(power: boolean): void {
    const slot = this.secondary;
    this.trace(`FAULT: secondary ${power ? 'POWER LOSS' : 'KILLED'}`);
    if (power) this.stats.powerLosses += 1;
    else this.stats.kills += 1;
    this.markDown(slot);
    this.net.listener = null;
    this.io.dropNode('secondary', this.prng);
    this.time.dropNode('secondary');
    this.net.dropNode('secondary', power, this.prng);
    if (power) {
      for (const d of [this.replica, this.stateDisk, this.secLogDisk, this.secBitmapDisk]) d.crash(this.prng);
      this.workload.secondaryPowerLost();
      // Writes that did not survive are gone; the primary resends their regions under new ids.
      for (let i = this.writtenIds.length - 1; i >= 0; i--) {
        if (!this.durableIds.has(this.writtenIds[i])) this.writtenIds.splice(i, 1);
      }
    }
  }

  private markDown<T>(slot: Slot<T>): void {
    slot.state = 'down';
    slot.node = undefined;
    slot.incarnation += 1;
    slot.downSinceMs = this.time.nowMs;
  }

  fail(kind: FailureKind, message: string): void {
    this.failure ??= new SimFailure(kind, message);
  }

  // -----------------------------------------------------------------------------------------------
  // What the checks read

  /** Update ids in flight to the replica: sent and not yet written by a live secondary. */
  updatesInFlight(): Array<{ id: number; offset: number; length: number }> {
    const node = this.secondary.node;
    // A secondary that is not up lost what was on its way to it (and listens to nothing yet).
    if (this.secondary.state !== 'up' || node === undefined) return [];
    const written = node.applier.writtenId;
    while (this.sentUpdates.length > 0 && this.sentUpdates[0].id <= written) this.sentUpdates.shift();
    return this.sentUpdates;
  }

  /** The first ack the secondary sent for an update whose data was not durable yet (checks.ts fails on it). */
  ackNotDurable: string | undefined;

  private checkAckDurable(ackId: number): void {
    const missing = this.writtenIds.find((id) => id <= ackId && !this.durableIds.has(id));
    if (missing !== undefined && this.ackNotDurable === undefined)
      this.ackNotDurable = `the secondary acked update ${ackId} as durable, but update ${missing} is not durable on the replica`;
  }

  /**
   * Frames the primary sent (updates) and received (acks, welcomes), and the acks the secondary
   * sent, decoded as they pass.
   */
  private sniff(end: SimEnd, direction: 'sent' | 'delivered', chunk: Buffer): void {
    const sniffers = this.sniffers[direction];
    let s = sniffers.get(end);
    if (s === undefined) {
      s = { queue: new ChunkQueue(), decoder: new FrameDecoder() };
      sniffers.set(end, s);
    }
    s.queue.push(Buffer.from(chunk));
    for (;;) {
      const r = s.decoder.next(s.queue);
      if (r === undefined) return;
      if (r.kind === 'error') {
        // The network here never changes a byte: the sender's own bytes changed after it framed
        // them (memory reused while still queued to send?) or it framed them wrong.
        if (direction === 'sent') this.fail('correctness', `the ${end.node} sent a bad frame: ${r.reason}`);
        return;
      }
      const m = decodeMessage(r.frame);
      if (end.node === 'secondary') {
        // The moment the secondary says "durable": every update up to it must be (H5).
        if (m.type === 'ack') this.checkAckDurable(m.ack.id);
        else if (m.type === 'welcome') this.checkAckDurable(m.welcome.lastAppliedUpdate);
        continue;
      }
      if (m.type === 'update')
        this.sentUpdates.push({ id: m.update.id, offset: m.update.offset, length: m.update.length });
      else if (m.type === 'ack') this.maxAckSeen = Math.max(this.maxAckSeen, m.ack.id);
      else if (m.type === 'welcome') this.maxAckSeen = Math.max(this.maxAckSeen, m.welcome.lastAppliedUpdate);
    }
  }

  // -----------------------------------------------------------------------------------------------
  // The end: heal, converge, compare

  private async converge(): Promise<void> {
    this.trace('HEAL: faults end; both nodes up; the client stops');
    this.net.blackholed = false;
    for (let i = 0; i < CONVERGE_STEPS_MAX; i++) {
      this.step += 1;
      if (this.primary.state === 'down') this.startPrimary();
      if (this.secondary.state === 'down') this.startSecondary();
      if (this.io.pending.length > 0) this.completeIo();
      else {
        const netSteps = this.net.steps(this.prng);
        if (netSteps.length > 0) this.prng.pick(netSteps)();
        else if (this.inSync()) break;
        else {
          const next = this.time.nextTimerMs();
          if (next === Number.POSITIVE_INFINITY) {
            throw new SimFailure(
              'liveness',
              `the pair is stuck out of sync with nothing left to do: ${this.syncState()}`,
            );
          }
          this.advance(Math.max(next, this.time.nowMs));
        }
      }
      await this.afterStep();
    }
    if (!this.inSync()) throw new SimFailure('liveness', `the pair did not converge: ${this.syncState()}`);
    // The image is what both will keep: the replica's data is durable once acked.
    const v = this.volume.view(0, VOLUME_BYTES);
    const r = this.replica.view(0, VOLUME_BYTES);
    if (Buffer.compare(v, r) !== 0) {
      throw new SimFailure(
        'correctness',
        `after converging the replica differs from the primary at ${firstDifference(v, r)}`,
      );
    }
    if (Buffer.compare(r, this.replica.durableView(0, VOLUME_BYTES)) !== 0) {
      throw new SimFailure(
        'correctness',
        'after converging, some of the replica is not durable though all was acked',
      );
    }
    // Everything is sent and acked: the node must have let go of every write's data (a lease it
    // forgets keeps an NBD client's receive memory, and in time stalls the connection).
    if (this.workload.unreleased !== 0) {
      throw new SimFailure(
        'liveness',
        `after converging the primary still holds the data of ${this.workload.unreleased} transactions`,
      );
    }
    const held = this.secondary.node?.receiveMemoryHeld ?? 0;
    if (held !== 0)
      throw new SimFailure(
        'liveness',
        `after converging the secondary still holds ${held} bytes of receive memory`,
      );
    this.trace(`converged: volume and replica identical (crc32c ${crc32c(Buffer.from(v)).toString(16)})`);
  }

  // -----------------------------------------------------------------------------------------------
  // Scripted tests: the same world, driven step by step without random faults

  /** Formats both sides and starts both nodes. */
  async begin(): Promise<void> {
    await this.format();
    this.startSecondary();
    this.startPrimary();
    await settle();
  }

  /**
   * Runs without faults, deterministically (I/O first, in order, then the network, then timers),
   * until `done()`; every invariant is checked after each step. Fails if it does not get there.
   */
  async runUntil(done: () => boolean, what: string, maxSteps = 20_000): Promise<void> {
    for (let i = 0; i < maxSteps; i++) {
      if (done()) return;
      this.step += 1;
      if (this.io.pending.length > 0) {
        const op = this.io.pending.shift()!;
        op.finish();
        this.stats.ioCompleted += 1;
      } else {
        const netSteps = this.net.steps();
        if (netSteps.length > 0) netSteps[0]();
        else {
          const next = this.time.nextTimerMs();
          if (next === Number.POSITIVE_INFINITY) break;
          this.advance(Math.max(next, this.time.nowMs));
        }
      }
      await this.afterStep();
    }
    if (!done()) throw new SimFailure('liveness', `never got to: ${what}: ${this.syncState()}`);
  }

  /** One client write (or zero/trim) of whole sectors, through the primary; resolves once it completed. */
  async clientWrite(
    firstSector: number,
    sectors: number,
    kind: WriteKind = 'data',
    fua = false,
  ): Promise<void> {
    const node = this.primary.node;
    if (node === undefined) throw new Error('the primary is not up');
    const before = this.workload.completedCount;
    this.workload.submitExact(
      node,
      [{ firstSector, sectors, kind }],
      fua,
      () => this.step,
      () => {
        const link = node.status().link;
        return link?.state === 'streaming' ? link.connections : 0;
      },
    );
    await this.runUntil(() => this.workload.completedCount > before, 'the client write to complete');
  }

  inSync(): boolean {
    const node = this.primary.node;
    if (this.primary.state !== 'up' || this.secondary.state !== 'up' || node === undefined) return false;
    if (this.workload.outstanding > 0 || this.io.pending.length > 0) return false;
    return statusInSync(node.status());
  }

  private syncState(): string {
    return JSON.stringify({
      primary: this.primary.state,
      secondary: this.secondary.state,
      status: this.primary.node?.status(),
      secondaryStatus: this.secondary.node?.status(),
      outstanding: this.workload.outstanding,
      io: this.io.pending.map((op) => `${op.node} ${op.what}`),
      connections: this.net.connections.length,
    });
  }
}

/** A primary's status says in sync: nothing dirty or pending, streaming, the replica consistent. */
export function statusInSync(s: PrimaryNodeStatus): boolean {
  return (
    s.dirtyRegions === 0 &&
    s.pendingUpdates === 0 &&
    s.link?.state === 'streaming' &&
    s.link.replicaConsistent
  );
}

/** Lets every promise continuation of the step run (nothing in the world does real I/O). */
export function settle(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

function brief(fields: object): string {
  const text = JSON.stringify(fields);
  return text === '{}' ? '' : text.length > 160 ? `${text.slice(0, 160)}…` : text;
}

function firstDifference(a: Uint8Array, b: Uint8Array): string {
  for (let i = 0; i < a.length; i++) {
    if (a[i] !== b[i])
      return `byte ${i} (region ${Math.floor(i / REGION_BYTES)}, sector ${Math.floor(i / SECTOR_BYTES)})`;
  }
  return 'nowhere';
}
