/**
 * The failover simulator: two sites, each with a volume, a log, a bitmap and both state files,
 * running the real PrimaryNode or SecondaryNode over simulated disks, network and clock, one seed
 * per run. Beside the steps of the main simulator (I/O, delivery, time, writeback, client writes,
 * process kills and power losses) it changes roles the way an operator does — promote (now and then
 * with --force on an inconsistent replica), demote, start an old primary as a secondary without
 * demote, --discard-local-changes, `volrep create --force --secondary-of` over the volume as it is
 * or on a new file (born zero; even seeds also start both sites born zero) — with the real rule
 * code (src/volume/roles.ts), committed atomically as meta.json's rename is.
 *
 * Ground truth, kept by the simulator and never read from the code under test: which regions each
 * site wrote while apart and has not given up ("kept"), and the volumes' bytes. Checked at every
 * handshake the secondary decides (model/gen_model.py's checks, on the real code):
 *   - a resync never overwrites a kept write the receiver holds and the sender lacks;
 *   - a split brain is reported only when both sides hold such writes (or a side was promoted
 *     with --force, whose data is no state its peer had), and always when both do;
 * and at the end: the operator resolves what the handshake refused, every fault heals, the pair
 * converges and the volumes are byte-identical (so every region that differed was sent).
 *
 *   node --import tsx test/sim/failover.ts --seeds 2000 [--seed S]   (VOLREP_SIM_TRACE=1: the trace)
 */
import { crc32c } from '@node-rs/crc32';
import { SLOT_FILE_BYTES, SlotFile } from '../../src/io/slot-file.js';
import { BitmapFile } from '../../src/log/bitmap-file.js';
import { LogFile } from '../../src/log/log-file.js';
import type { ReplicaState } from '../../src/replication/applier.js';
import type { HandshakeOutcome } from '../../src/replication/generations.js';
import type { PairState } from '../../src/replication/primary-session.js';
import {
  type NodeLogger,
  PrimaryNode,
  type PrimaryNodeConfig,
  validatePairState,
} from '../../src/shell/primary-node.js';
import {
  INITIAL_REPLICA_STATE,
  SecondaryNode,
  validateReplicaState,
} from '../../src/shell/secondary-node.js';
import { discardLocalChanges, promotedPairState, secondaryState } from '../../src/volume/roles.js';
import { Prng } from './prng.js';
import { SimDisk } from './sim-disk.js';
import { IoQueue, type NodeName, SimDevice, SimFile, SimNetwork, SimTime } from './sim-io.js';
import { SIM_BORN_ZERO, SIM_VOLUME_ID, SimFailure, settle, statusInSync } from './world.js';

const REGION = 4096;
const REGIONS = 8;
const VOLUME_BYTES = REGIONS * REGION;
const STEPS = 800;
const CONVERGE_STEPS_MAX = 40_000;

type Role = 'primary' | 'secondary';

interface Site {
  name: 'X' | 'Y';
  role: Role;
  volume: SimDisk;
  log: SimDisk;
  bitmap: SimDisk;
  pair: SimDisk;
  state: SimDisk;
  node: PrimaryNode | SecondaryNode | undefined;
  starting: boolean;
  incarnation: number;
  /** Tags of the writes this site made while apart and has not given up (ground truth). */
  kept: Set<number>;
  /** Every write tag this site's volume ever held. */
  seen: Set<number>;
  /** Tags of writes submitted while apart (completed or not), not given up. */
  attempted: Set<number>;
  /** Promoted with --force while inconsistent, and no complete resync into it since. */
  forced: boolean;
}

export interface FailoverResult {
  seed: number;
  ok: boolean;
  message?: string;
  trace?: string;
  decisions: Partial<Record<HandshakeOutcome, number>>;
  roleChanges: number;
}

export class FailoverSim {
  readonly prng: Prng;
  readonly time = new SimTime();
  readonly io = new IoQueue();
  readonly net = new SimNetwork();
  readonly sites: [Site, Site];
  readonly decisions: Partial<Record<HandshakeOutcome, number>> = {};
  roleChanges = 0;
  private step = 0;
  private clientBusy = true;
  private generationIds = 0;
  private writeTag = 0;
  /** Which site wrote each tag, and to which region. */
  private readonly writes = new Map<number, { site: Site; region: number }>();
  private readonly traceLines: string[] = [];
  private failure: SimFailure | undefined;
  private readonly judged = new WeakSet<object>();
  private readonly config: PrimaryNodeConfig;
  private readonly logger: NodeLogger;
  /** How often a running node is killed or loses power (drawn per seed: calm to stormy). */
  private readonly faultWeight: number;

  constructor(readonly seed: number) {
    this.prng = new Prng(seed);
    const site = (name: 'X' | 'Y', role: Role): Site => ({
      name,
      role,
      volume: new SimDisk(VOLUME_BYTES, { atomicBytes: 512, modes: ['whole', 'absent', 'partial'] }),
      log: new SimDisk(LogFile.fileBytes(2048)),
      bitmap: new SimDisk(BitmapFile.fileBytes(REGIONS)),
      pair: new SimDisk(SLOT_FILE_BYTES),
      state: new SimDisk(SLOT_FILE_BYTES),
      node: undefined,
      starting: false,
      incarnation: 0,
      kept: new Set(),
      seen: new Set([0]),
      attempted: new Set(),
      forced: false,
    });
    this.sites = [site('X', 'primary'), site('Y', 'secondary')];
    this.faultWeight = this.prng.pick([0.03, 0.1, 0.3]);
    this.config = {
      volumeSize: VOLUME_BYTES,
      regionSize: REGION,
      activityWindowRegions: this.prng.pick([1, 2, 4]),
      inflightBytesMax: 16 * 1024,
      ackTimeoutMs: 500,
      txWritesMax: 1,
      syncMode: this.prng.chance(0.3),
    };
    this.logger = {
      debug: () => {},
      info: (f, m) => this.trace(`  log: ${m} ${brief(f)}`),
      warn: (f, m) => this.trace(`  log: ${m} ${brief(f)}`),
      error: (f, m) => this.trace(`  log: ERROR ${m} ${brief(f)}`),
    };
  }

  private newGenerationId = () => (++this.generationIds).toString(16).padStart(16, '0');

  trace(line: string): void {
    const text = `${String(this.step).padStart(5)} ${String(Math.round(this.time.nowMs)).padStart(6)}ms ${line}`;
    if (process.env.VOLREP_SIM_TRACE) process.stderr.write(`${text}\n`);
    this.traceLines.push(text);
    if (this.traceLines.length > 400) this.traceLines.splice(0, 200);
  }

  private fail(message: string): never {
    throw new SimFailure('correctness', message);
  }

  /** `volrep create` on both sites; on even seeds it made both volumes (all zeros: born zero). */
  private async format(): Promise<void> {
    const bornZero = this.seed % 2 === 0;
    for (const s of this.sites) {
      await LogFile.format(s.log);
      await BitmapFile.format(s.bitmap, REGIONS);
      await SlotFile.format(s.pair, {
        replicaEverSynced: false,
        generations: { current: this.newGenerationId(), base: null, history: [], resync: null },
        ...(bornZero && { volumeBornZero: SIM_BORN_ZERO }),
      } satisfies PairState);
      await SlotFile.format(s.state, {
        ...INITIAL_REPLICA_STATE,
        ...(bornZero && { bornZero: SIM_BORN_ZERO }),
      } satisfies ReplicaState);
      for (const d of [s.log, s.bitmap, s.pair, s.state, s.volume]) d.syncSync();
    }
  }

  async run(): Promise<FailoverResult> {
    try {
      await this.format();
      this.start(this.sites[1]);
      this.start(this.sites[0]);
      await settle();
      for (let i = 0; i < STEPS; i++) {
        this.step += 1;
        await this.randomStep();
        await this.afterStep();
      }
      await this.converge();
      return { seed: this.seed, ok: true, decisions: this.decisions, roleChanges: this.roleChanges };
    } catch (err) {
      const message =
        err instanceof SimFailure ? err.message : `the code under test threw: ${(err as Error).stack}`;
      return {
        seed: this.seed,
        ok: false,
        message,
        trace: this.traceLines.slice(-80).join('\n'),
        decisions: this.decisions,
        roleChanges: this.roleChanges,
      };
    }
  }

  private async afterStep(): Promise<void> {
    await settle();
    this.net.prune();
    if (this.failure) throw this.failure;
    this.observe();
    this.checkHandshakes();
  }

  // -----------------------------------------------------------------------------------------------
  // Nodes

  private label(site: Site): NodeName {
    return site.role;
  }

  private runningIn(role: Role): Site | undefined {
    return this.sites.find((s) => s.role === role && (s.node !== undefined || s.starting));
  }

  private start(site: Site): void {
    if (site.node !== undefined || site.starting) return;
    if (this.runningIn(site.role) !== undefined) return; // one process per role at a time
    site.starting = true;
    const incarnation = ++site.incarnation;
    const who = this.label(site);
    this.trace(`${site.name} starts as ${site.role}`);
    const onFailure = (err: Error) => {
      if (incarnation === site.incarnation)
        this.failure ??= new SimFailure('crash', `${site.name} failed: ${err.message}`);
    };
    const up = (node: PrimaryNode | SecondaryNode) => {
      if (incarnation !== site.incarnation) return;
      site.node = node;
      site.starting = false;
      this.trace(`${site.name} up as ${site.role}`);
    };
    const failed = (err: Error) => {
      if (incarnation === site.incarnation)
        this.failure ??= new SimFailure('crash', `${site.name} could not start: ${err.stack}`);
    };
    if (site.role === 'primary') {
      PrimaryNode.open(
        {
          log: new SimFile(this.io, who, site.log, `${site.name} log`),
          bitmap: new SimFile(this.io, who, site.bitmap, `${site.name} bitmap`),
          pairState: new SimFile(this.io, who, site.pair, `${site.name} pair-state`),
          volume: new SimDevice(this.io, who, site.volume, `${site.name} volume`),
        },
        this.config,
        {
          clock: this.time.clockFor(who),
          logger: this.logger,
          volumeAsCreated: () => true,
          link: {
            dialer: this.net.dialer(),
            hello: { volumeId: SIM_VOLUME_ID, size: VOLUME_BYTES, regionSize: REGION },
            assumeClean: false,
          },
          newGenerationId: this.newGenerationId,
          onFailure,
        },
      ).then(up, failed);
    } else {
      SecondaryNode.open(
        {
          replica: new SimDevice(this.io, who, site.volume, `${site.name} replica`),
          state: new SimFile(this.io, who, site.state, `${site.name} replica-state`),
          log: new SimFile(this.io, who, site.log, `${site.name} log`),
          bitmap: new SimFile(this.io, who, site.bitmap, `${site.name} bitmap`),
        },
        { volumeId: SIM_VOLUME_ID, size: VOLUME_BYTES, regionSize: REGION },
        { clock: this.time.clockFor(who), logger: this.logger, onFailure, replicaAsCreated: () => true },
      ).then((node) => {
        if (incarnation !== site.incarnation) return;
        this.net.listener = (c) => node.accept(c);
        up(node);
      }, failed);
    }
  }

  /** SIGKILL (the page cache survives) or power loss (unsynced writes lost or torn). */
  private down(site: Site, power: boolean): void {
    if (site.node === undefined && !site.starting) return;
    this.trace(`FAULT: ${site.name} (${site.role}) ${power ? 'POWER LOSS' : 'KILLED'}`);
    const who = this.label(site);
    if (site.role === 'secondary') this.net.listener = null;
    site.node = undefined;
    site.starting = false;
    site.incarnation += 1;
    this.io.dropNode(who, this.prng);
    this.time.dropNode(who);
    this.net.dropNode(who, power, this.prng);
    if (power)
      for (const d of [site.volume, site.log, site.bitmap, site.pair, site.state]) d.crash(this.prng);
  }

  // -----------------------------------------------------------------------------------------------
  // Role changes of a stopped site (what `volrep promote/demote/secondary` do, on its files)

  private async readState<T>(
    disk: SimDisk,
    name: string,
    validate: (v: unknown) => T | undefined,
  ): Promise<T> {
    return (await SlotFile.open(disk, name, validate)).value;
  }

  private async roleChange(site: Site): Promise<void> {
    const p = this.prng;
    if (site.role === 'secondary') {
      const state = await this.readState(site.state, 'replica-state', (v) =>
        validateReplicaState(v, SIM_VOLUME_ID),
      );
      if (p.chance(0.08)) {
        // volrep create --force --secondary-of: new metadata over the volume file as it is, or
        // with the volume file made anew (all zeros: born zero). It gives up everything.
        const fresh = p.chance(0.5);
        if (fresh) site.volume.poke(0, new Uint8Array(VOLUME_BYTES));
        await LogFile.format(site.log);
        await BitmapFile.format(site.bitmap, REGIONS);
        await SlotFile.format(site.state, {
          ...INITIAL_REPLICA_STATE,
          ...(fresh && { bornZero: SIM_BORN_ZERO }),
        } satisfies ReplicaState);
        for (const d of [site.log, site.bitmap, site.state]) d.syncSync();
        site.kept = new Set();
        site.attempted = new Set();
        site.forced = false;
        this.trace(`${site.name}: re-created as a secondary${fresh ? ' on a new volume file' : ''}`);
        this.roleChanges += 1;
        return;
      }
      if (p.chance(0.3) && state.generations.base !== null) {
        // --discard-local-changes, at its next start as a secondary
        await discardLocalChanges(site.state, SIM_VOLUME_ID);
        this.giveUp(site);
        this.trace(`${site.name}: --discard-local-changes`);
        return;
      }
      const force = !state.consistent && p.chance(0.15);
      let pair: PairState;
      try {
        pair = promotedPairState(state, force, site.name, this.newGenerationId);
      } catch {
        this.trace(`${site.name}: promote refused (inconsistent)`);
        return;
      }
      await SlotFile.format(site.pair, pair);
      site.role = 'primary'; // meta.json's rename: the commit
      if (force) site.forced = true;
      this.trace(`${site.name}: promote${force ? ' --force' : ''} ${JSON.stringify(pair.generations)}`);
    } else {
      const pair = await this.readState(site.pair, 'pair-state', (v) => validatePairState(v, SIM_VOLUME_ID));
      const giveUp = p.chance(0.6);
      const state: ReplicaState = secondaryState(pair, giveUp);
      await SlotFile.format(site.state, state);
      site.role = 'secondary';
      if (giveUp) this.giveUp(site);
      this.trace(
        `${site.name}: ${giveUp ? 'demote' : 'started as a secondary without demote'} ${JSON.stringify(state.generations)}`,
      );
    }
    this.roleChanges += 1;
  }

  // -----------------------------------------------------------------------------------------------
  // Steps

  private async randomStep(): Promise<void> {
    const p = this.prng;
    this.time.advance(this.time.nowMs + p.int(1000) / 1000);
    const choices: Array<[number, () => void | Promise<void>]> = [];
    if (this.io.pending.length > 0) choices.push([30, () => this.completeIo()]);
    const netSteps = this.net.steps(p);
    if (netSteps.length > 0) choices.push([25, () => p.pick(netSteps)()]);
    // The client comes and goes: its pauses let resyncs finish.
    if (p.chance(0.03)) this.clientBusy = !this.clientBusy;
    const primary = this.sites.find((s) => s.role === 'primary' && s.node instanceof PrimaryNode);
    if (primary && this.clientBusy) choices.push([10, () => this.write(primary)]);
    const next = this.time.nextTimerMs();
    if (next !== Number.POSITIVE_INFINITY) {
      const idle = this.io.pending.length === 0 && netSteps.length === 0;
      choices.push([idle ? 20 : 0.15, () => void this.time.advance(Math.max(next, this.time.nowMs))]);
    }
    choices.push([2, () => this.writeback()]);
    for (const site of this.sites) {
      if (site.node !== undefined) choices.push([this.faultWeight, () => this.down(site, p.chance(0.5))]);
      else if (!site.starting) {
        choices.push([3, () => this.start(site)]);
        choices.push([0.4, () => this.roleChange(site)]);
      }
    }
    let total = 0;
    for (const [w] of choices) total += w;
    let r = (p.next() / 2 ** 32) * total;
    for (const [w, act] of choices) {
      r -= w;
      if (r < 0) return act();
    }
  }

  private completeIo(): void {
    this.io.completeOne(this.prng);
  }

  private writeback(): void {
    const disks = this.sites.flatMap((s) => [s.volume, s.log, s.bitmap, s.pair, s.state]);
    for (let i = 0; i < 4; i++) if (this.prng.pick(disks).writeback(this.prng)) return;
  }

  /**
   * A client write of one whole region, tagged (its first 4 bytes) so that the region's content
   * names the write it holds; kept (ground truth) if it was submitted while apart.
   */
  private write(site: Site): void {
    const node = site.node as PrimaryNode;
    const region = this.prng.int(REGIONS);
    const tag = ++this.writeTag;
    const data = Buffer.alloc(REGION, tag & 0xff);
    data.writeUInt32BE(tag, 0);
    const link = node.status().link?.state;
    const apart = link !== 'streaming' && link !== 'marking';
    if (apart) site.attempted.add(tag);
    this.writes.set(tag, { site, region });
    const incarnation = site.incarnation;
    node.submit([{ offset: region * REGION, kind: 'data', length: REGION, data: [data] }], {}, (err) => {
      if (err || incarnation !== site.incarnation) return;
      if (apart) site.kept.add(tag);
    });
  }

  /** The tag of the write whose bytes region `r` of `site` holds (0: none yet). */
  private tag(site: Site, r: number): number {
    return Buffer.from(site.volume.view(r * REGION, 4)).readUInt32BE(0);
  }

  /** What each volume holds now: every tag it ever held is "seen" there. */
  private observe(): void {
    for (const s of this.sites) for (let r = 0; r < REGIONS; r++) s.seen.add(this.tag(s, r));
  }

  /** Demote, discard: the writes made apart that the peer never held are given up. */
  private giveUp(site: Site): void {
    const other = this.sites.find((x) => x !== site)!;
    site.kept = new Set([...site.kept].filter((t) => other.seen.has(t)));
    site.attempted = new Set([...site.attempted].filter((t) => other.seen.has(t)));
  }

  // -----------------------------------------------------------------------------------------------
  // Checks

  private differs(r: number): boolean {
    const [x, y] = this.sites;
    return Buffer.compare(x.volume.view(r * REGION, REGION), y.volume.view(r * REGION, REGION)) !== 0;
  }

  /**
   * Regions where `site` holds a kept write its peer never held and that no later write of its
   * own to the region, which the peer did hold, supersedes (model/gen_model.py's truths: a newer
   * write by a node that had seen w supersedes w). A power loss can take the newer write's bytes
   * from `site` after it was replicated and leave the older one there.
   */
  private keptOnly(site: Site): number[] {
    const other = this.sites.find((x) => x !== site)!;
    const out: number[] = [];
    for (let r = 0; r < REGIONS; r++) {
      const t = this.tag(site, r);
      if (t === this.tag(other, r) || !site.kept.has(t) || other.seen.has(t)) continue;
      const superseded = [...other.seen].some((u) => {
        const w = this.writes.get(u);
        return u > t && w !== undefined && w.site === site && w.region === r;
      });
      if (!superseded) out.push(r);
    }
    return out;
  }

  /**
   * `site` began a write while apart (its new generation is durable before the write is issued)
   * that it has not given up and its peer never held. A generation begun for a write that then
   * never completed, or whose bytes a power loss took, is still a history of its own: a split
   * brain reported for it is conservative, not false.
   */
  private wroteApart(site: Site): boolean {
    const other = this.sites.find((x) => x !== site)!;
    return [...site.attempted].some((t) => !other.seen.has(t));
  }

  /** Each decision a running secondary reports, judged against the ground truth at that moment. */
  private checkHandshakes(): void {
    for (const s of this.sites) {
      if (!(s.node instanceof SecondaryNode)) continue;
      const status = s.node.status();
      const h = status.handshake;
      // A resync into this replica ended: a forced promotion's mix is repaired.
      if (h !== null && status.consistent && (h.decision === 'resync' || h.decision === 'fullSync'))
        s.forced = false;
      if (h === null || this.judged.has(h)) continue;
      this.judged.add(h);
      const p = this.sites.find((x) => x !== s)!;
      this.decisions[h.decision] = (this.decisions[h.decision] ?? 0) + 1;
      // The primary began a generation after its hello (a write apart while the handshake was on
      // the wire): it drops this handshake itself, and the next hello is judged instead.
      if (p.node instanceof PrimaryNode && p.node.status().generations.current !== h.peer?.current) {
        this.trace(`handshake ${p.name}→${s.name}: ${h.decision} on a hello ${p.name} has moved on from`);
        continue;
      }
      const lostS = this.keptOnly(s);
      const lostP = this.keptOnly(p);
      this.trace(
        `handshake ${p.name}→${s.name}: ${h.decision} (kept-only ${p.name}=[${lostP}] ${s.name}=[${lostS}])`,
      );
      const accepted = h.decision === 'resync' || h.decision === 'fullSync';
      if (accepted && lostS.length > 0)
        this.fail(
          `resync ${p.name}→${s.name} would overwrite writes ${s.name} made apart in regions [${lostS}]`,
        );
      // A split brain needs both sides to have written apart; the bytes of such a write may since
      // have been lost to a power loss before a FLUSH (NBD's promise), which no history can know.
      if (
        h.decision === 'splitBrain' &&
        !(this.wroteApart(p) && this.wroteApart(s)) &&
        !p.forced &&
        !s.forced
      )
        this.fail(`false split brain (kept-only: ${p.name}=[${lostP}], ${s.name}=[${lostS}])`);
      // (A forced replica that was never in sync has a history of its own: unrelated, not split.)
      if (h.decision !== 'splitBrain' && lostP.length > 0 && lostS.length > 0 && !p.forced && !s.forced)
        this.fail(`missed split brain: decided ${h.decision} with kept writes on both sides`);
    }
  }

  /**
   * Faults end; the operator resolves what the handshake refused (discard the secondary's writes
   * on a split brain, reverse the roles when the secondary is newer, re-create it when unrelated);
   * the pair must converge to identical volumes.
   */
  private async converge(): Promise<void> {
    this.trace('HEAL: faults end, the operator resolves refusals');
    let resolutions = 0;
    for (let i = 0; i < CONVERGE_STEPS_MAX; i++) {
      this.step += 1;
      const [x, y] = this.sites;
      if (x.role === y.role) {
        // Two of a kind: the one that is not running (or Y) changes role.
        const change = x.node === undefined && !x.starting ? x : y;
        this.down(change, false);
        await this.roleChangeTo(change, x.role === 'primary' ? 'secondary' : 'primary');
      }
      for (const s of this.sites) if (s.node === undefined && !s.starting) this.start(s);
      const sec = this.sites.find((s) => s.node instanceof SecondaryNode);
      const refused = sec && (sec.node as SecondaryNode).status().handshake;
      if (refused && !['resync', 'fullSync'].includes(refused.decision) && resolutions < 6) {
        resolutions += 1;
        await this.resolve(sec!, refused.decision);
        await this.afterStep();
        continue;
      }
      if (this.io.pending.length > 0) this.completeIo();
      else {
        const steps = this.net.steps(this.prng);
        if (steps.length > 0) this.prng.pick(steps)();
        else if (this.inSync()) break;
        else {
          const next = this.time.nextTimerMs();
          if (next === Number.POSITIVE_INFINITY) throw new SimFailure('liveness', `stuck: ${this.state()}`);
          this.time.advance(Math.max(next, this.time.nowMs));
        }
      }
      await this.afterStep();
    }
    if (!this.inSync()) throw new SimFailure('liveness', `the pair did not converge: ${this.state()}`);
    const [x, y] = this.sites;
    const a = x.volume.view(0, VOLUME_BYTES);
    const b = y.volume.view(0, VOLUME_BYTES);
    if (Buffer.compare(a, b) !== 0) {
      const regions = [...Array(REGIONS).keys()].filter((r) => this.differs(r));
      this.fail(`after converging the volumes differ in regions [${regions}]`);
    }
    this.trace(`converged: identical (crc32c ${crc32c(Buffer.from(a)).toString(16)})`);
  }

  private async roleChangeTo(site: Site, role: Role): Promise<void> {
    if (role === 'primary') {
      const state = await this.readState(site.state, 'replica-state', (v) =>
        validateReplicaState(v, SIM_VOLUME_ID),
      );
      await SlotFile.format(site.pair, promotedPairState(state, true, site.name, this.newGenerationId));
      if (!state.consistent) site.forced = true;
    } else {
      const pair = await this.readState(site.pair, 'pair-state', (v) => validatePairState(v, SIM_VOLUME_ID));
      await SlotFile.format(site.state, secondaryState(pair, false));
    }
    site.role = role;
    this.trace(`HEAL: ${site.name} becomes ${role}`);
  }

  /** What the README tells the operator to do for each refusal. */
  private async resolve(sec: Site, decision: HandshakeOutcome): Promise<void> {
    const prim = this.sites.find((s) => s !== sec)!;
    this.trace(`HEAL: resolve ${decision}`);
    this.down(sec, false);
    const state = await this.readState(sec.state, 'replica-state', (v) =>
      validateReplicaState(v, SIM_VOLUME_ID),
    );
    if (decision === 'splitBrain' && state.generations.base !== null) {
      await discardLocalChanges(sec.state, SIM_VOLUME_ID);
      this.giveUp(sec);
    } else if (decision === 'peerNewer') {
      // Reverse the roles: the newer side becomes the primary, the other is demoted.
      this.down(prim, false);
      const pair = await this.readState(prim.pair, 'pair-state', (v) => validatePairState(v, SIM_VOLUME_ID));
      await SlotFile.format(prim.state, secondaryState(pair, true));
      prim.role = 'secondary';
      this.giveUp(prim);
      await SlotFile.format(sec.pair, promotedPairState(state, true, sec.name, this.newGenerationId));
      sec.role = 'primary';
    } else {
      // Unrelated, an old generation, or a split brain with nothing to discard here (its history
      // is not its own: a forced promotion): re-create the secondary, a full sync follows.
      await SlotFile.format(sec.state, INITIAL_REPLICA_STATE);
      await BitmapFile.format(sec.bitmap, REGIONS);
      this.giveUp(sec);
      sec.forced = false;
    }
  }

  private inSync(): boolean {
    const prim = this.sites.find((s) => s.node instanceof PrimaryNode);
    const sec = this.sites.find((s) => s.node instanceof SecondaryNode);
    if (!prim || !sec || this.io.pending.length > 0) return false;
    return statusInSync((prim.node as PrimaryNode).status());
  }

  private state(): string {
    return JSON.stringify(
      this.sites.map((s) => ({
        site: s.name,
        role: s.role,
        up: s.node !== undefined,
        status: s.node?.status(),
      })),
    );
  }
}

function brief(fields: object): string {
  const text = JSON.stringify(fields);
  return text === '{}' ? '' : text.length > 160 ? `${text.slice(0, 160)}…` : text;
}

export async function runFailoverSeeds(
  first: number,
  count: number,
): Promise<{
  failed: FailoverResult[];
  decisions: Record<string, number>;
  roleChanges: number;
  seconds: number;
}> {
  const started = performance.now();
  const failed: FailoverResult[] = [];
  const decisions: Record<string, number> = {};
  let roleChanges = 0;
  for (let seed = first; seed < first + count; seed++) {
    const r = await new FailoverSim(seed).run();
    for (const [k, v] of Object.entries(r.decisions)) decisions[k] = (decisions[k] ?? 0) + (v ?? 0);
    roleChanges += r.roleChanges;
    if (!r.ok) failed.push(r);
  }
  return { failed, decisions, roleChanges, seconds: (performance.now() - started) / 1000 };
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const args = process.argv.slice(2);
  const flag = (name: string) => {
    const i = args.indexOf(name);
    return i >= 0 ? Number(args[i + 1]) : undefined;
  };
  const one = flag('--seed');
  const first = one ?? 1;
  const count = one !== undefined ? 1 : (flag('--seeds') ?? 500);
  const r = await runFailoverSeeds(first, count);
  for (const f of r.failed.slice(0, 3))
    process.stdout.write(
      `FAILED seed ${f.seed}: ${f.message}\n${f.trace}\nreplay: node --import tsx test/sim/failover.ts --seed ${f.seed}\n`,
    );
  process.stdout.write(
    `${count} failover seeds in ${r.seconds.toFixed(1)} s: ${r.roleChanges} role changes, decisions ${JSON.stringify(r.decisions)}; ${r.failed.length} failed\n`,
  );
  process.exit(r.failed.length > 0 ? 1 : 0);
}
