/**
 * Role changes of a stopped node (DESIGN.md §7, model/gen_model.py): promote a replica, demote a
 * primary, or start an old primary as a secondary without giving anything up.
 *
 * Each writes the new role's state file first, then commits with meta.json's atomic rename: a
 * power loss before the rename leaves the node exactly as it was (the new file is not read in
 * the old role), after it the whole change (the model's --flag demote_not_atomic shows why the
 * generation must not change before the role does).
 */
import path from 'node:path';
import { VolrepError } from '../errors.js';
import type { BlockFile } from '../io/block-file.js';
import { SlotFile } from '../io/slot-file.js';
import type { ReplicaState } from '../replication/applier.js';
import { forcedPromotion, type Generations, giveUpGeneration } from '../replication/generations.js';
import type { PairState } from '../replication/primary-session.js';
import { randomGenerationId, validatePairState } from '../shell/primary-node.js';
import { validateReplicaState } from '../shell/secondary-node.js';
import { type Meta, writeMeta } from './meta.js';
import {
  formatSlotFile,
  openMetadataFile,
  PAIR_STATE_FILE,
  REPLICA_STATE_FILE,
  VolumeFile,
} from './volume.js';

/**
 * The pair state a promoted replica starts with (the rule, for the CLI and the simulator): its
 * generation as it is (a new one comes with its first write). Refuses a replica marked
 * inconsistent, or never in sync, unless `force`.
 */
export function promotedPairState(
  state: ReplicaState,
  force: boolean,
  what: string,
  newId = randomGenerationId,
): PairState {
  if (!state.consistent && !force) {
    throw new VolrepError(
      'VOLREP_ERR_INCONSISTENT',
      state.generations.current === null
        ? `${what} was never in sync with a primary: it holds no primary's data. 'volrep promote --force' makes it a primary anyway, as a new, unrelated history`
        : `${what} is marked inconsistent: a resync into it was cut short, so some regions hold the primary's newer data and others older data — no state the primary ever had (a file system on it may not mount). Prefer the old primary if it can be reached; 'volrep promote --force' makes this replica a primary anyway, and a later meeting with the old primary is then reported as a split brain if that one wrote anything since`,
    );
  }
  // Forced: back to what it held before the cut-off resync (or a history of its own).
  const g = state.generations;
  const generations: Generations =
    (force && !state.consistent) || g.current === null ? forcedPromotion(g, newId) : g;
  return { replicaEverSynced: true, generations };
}

/**
 * The replica state a primary becoming a secondary starts with: with `giveUp` (demote) its
 * generation returns to the one both last shared; update ids restart with the new primary's;
 * consistent, as its data is a state a primary (itself) had (a resync into it marks it otherwise).
 */
export function secondaryState(pair: PairState, giveUp: boolean): ReplicaState {
  const generations = giveUp ? giveUpGeneration(pair.generations) : pair.generations;
  return { lastAppliedUpdate: 0, consistent: true, generations };
}

export interface RoleChange {
  meta: Meta;
  before: Generations;
  after: Generations;
}

async function readSlot<T>(
  metaDir: string,
  name: string,
  what: string,
  validate: (v: unknown) => T | undefined,
): Promise<T> {
  const file = await openMetadataFile(metaDir, name, what);
  try {
    return (await SlotFile.open(file, name, validate)).value;
  } catch (err) {
    if (err instanceof VolrepError)
      throw new VolrepError(err.code, `${path.join(metaDir, name)}: ${err.message}`);
    throw err;
  } finally {
    await file.close();
  }
}

async function commit(
  file: VolumeFile,
  stateName: string,
  state: unknown,
  role: Meta['role'],
): Promise<Meta> {
  await formatSlotFile(path.join(file.metaDir, stateName), state);
  const meta: Meta = { ...file.meta, role };
  await writeMeta(file.metaDir, meta);
  return meta;
}

/**
 * A stopped secondary becomes a primary. Keeps its generation (a new one comes with its first
 * write) and every region it has dirty. A replica marked inconsistent (a resync into it was cut
 * short) is refused unless `force`.
 */
export async function promote(
  volumePath: string,
  opts: { metaDir?: string; force?: boolean },
): Promise<RoleChange> {
  const file = await VolumeFile.open(volumePath, { metaDir: opts.metaDir });
  try {
    if (file.meta.role !== 'secondary')
      throw new VolrepError('VOLREP_ERR_ROLE', `${volumePath} is already a primary: nothing to promote`);
    const state = await readSlot(
      file.metaDir,
      REPLICA_STATE_FILE,
      'the replica state says whether this replica is consistent',
      (v) => validateReplicaState(v, file.meta.volumeId),
    );
    const pair = promotedPairState(state, opts.force === true, volumePath);
    const before = state.generations;
    const after = pair.generations;
    return { meta: await commit(file, PAIR_STATE_FILE, pair, 'primary'), before, after };
  } finally {
    await file.close();
  }
}

/**
 * A stopped primary becomes a secondary. With `giveUp` (demote) it gives up the history it began
 * while apart: its generation returns to the one both last shared. Without (an old primary
 * started as a secondary), it keeps it, and a peer that also wrote meets it as a split brain.
 * Its dirty regions stay either way: the secondary reports them, to be overwritten.
 */
export async function becomeSecondary(
  volumePath: string,
  opts: { metaDir?: string; giveUp: boolean },
): Promise<RoleChange> {
  const file = await VolumeFile.open(volumePath, { metaDir: opts.metaDir });
  try {
    if (file.meta.role !== 'primary')
      throw new VolrepError('VOLREP_ERR_ROLE', `${volumePath} is already a secondary: nothing to demote`);
    const pair = await readSlot(
      file.metaDir,
      PAIR_STATE_FILE,
      "the pair state holds this primary's data generation",
      (v) => validatePairState(v, file.meta.volumeId),
    );
    const state = secondaryState(pair, opts.giveUp);
    const before = pair.generations;
    const after = state.generations;
    return { meta: await commit(file, REPLICA_STATE_FILE, state, 'secondary'), before, after };
  } finally {
    await file.close();
  }
}

/** --discard-local-changes on a secondary (stopped, locked by the caller): give up the history begun apart. */
export async function discardLocalChanges(
  stateFile: BlockFile,
  volumeId: string,
): Promise<RoleChange['before'][]> {
  const { slots, value } = await SlotFile.open(stateFile, REPLICA_STATE_FILE, (v) =>
    validateReplicaState(v, volumeId),
  );
  const after = giveUpGeneration(value.generations);
  if (after !== value.generations) await slots.write({ ...value, consistent: false, generations: after });
  return [value.generations, after];
}
