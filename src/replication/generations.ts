/**
 * Data generations (DESIGN.md §7, checked exhaustively in model/gen_model.py): which side's data
 * is newer when two nodes meet. Pure: no I/O, no clock, no randomness (ids come from the caller).
 *
 * Each node keeps `current` (the generation of its data), a short `history` of earlier ones and,
 * while it holds writes its peer lacks, `base` (the generation both last shared). The set of
 * regions that may differ is the engine's dirty set (bitmap + log), kept beside it.
 */

/** A random id, never reused (16 hex digits). */
export type GenerationId = string;

export interface Generations {
  /** The generation of this node's data; null on a replica that was never in sync with anyone. */
  current: GenerationId | null;
  /** The generation both sides last shared, while this node holds writes made apart. */
  base: GenerationId | null;
  /** Earlier generations, oldest first (at most HISTORY_MAX). */
  history: GenerationId[];
  /**
   * On a replica a resync is being made into: it took the sender's generation when the resync
   * began, and `from` is the one it held before (null: it held nothing). Null otherwise.
   */
  resync: { from: GenerationId | null } | null;
}

export const HISTORY_MAX = 16;
const ID_PATTERN = /^[0-9a-f]{16}$|^legacy-[0-9a-f-]{36}$/;

/** What the handshake decides, P being the side that would send and S the side that would receive. */
export type HandshakeDecision =
  /** S never held anyone's data: a full sync (or none with --assume-clean at the pair's birth). */
  | 'fullSync'
  /** Resync P → S of P's dirty set ∪ S's own dirty set (empty on both: in sync). */
  | 'resync'
  /** S wrote apart, P did not: refuse this direction, S is newer. */
  | 'peerNewer'
  /** Both wrote apart from the same generation: refuse, report, wait for the operator. */
  | 'splitBrain'
  /** S's generation is only an old one of P's: a full sync, on explicit request only. */
  | 'fullOnRequest'
  /** Nothing in common. */
  | 'unrelated';

/** What a handshake may end in: a decision of the table, or a peer that is a primary too. */
export type HandshakeOutcome = HandshakeDecision | 'peerIsPrimary';

interface Rule {
  /** What the two histories say, in words (the README reproduces this table). */
  readonly when: string;
  readonly test: (p: Generations, s: Generations) => boolean;
  readonly decision: HandshakeDecision;
}

/** What a receiver's data is: the generation it held before a cut-off resync, else its own. */
function heldBefore(s: Generations): GenerationId | null {
  return s.resync !== null ? s.resync.from : s.current;
}

/**
 * The handshake's rules (model/gen_model.py `decide`), first match wins; the README reproduces
 * them. test/replication/generations.test.ts runs them against every case of the model.
 */
export const HANDSHAKE_RULES: readonly Rule[] = [
  {
    // First: a replica in its first full sync took the generation at its start.
    when: 'the secondary holds no one’s data (created, or its first full sync not done)',
    test: (_p, s) => heldBefore(s) === null,
    decision: 'fullSync',
  },
  {
    when: 'same generation',
    test: (p, s) => p.current === s.current,
    decision: 'resync',
  },
  {
    when: "the secondary is at the primary's base (only the primary wrote apart)",
    test: (p, s) => p.base !== null && (p.base === s.current || p.base === heldBefore(s)),
    decision: 'resync',
  },
  {
    when: 'the primary is back at the generation the secondary held before a resync that was cut off',
    test: (p, s) => heldBefore(s) === p.current,
    decision: 'resync',
  },
  {
    when: 'the secondary is in a resync cut off from the primary’s line (it has written nothing since)',
    test: (p, s) =>
      s.resync !== null &&
      ((heldBefore(s) !== null && p.history.includes(heldBefore(s)!)) ||
        (s.current !== null && p.history.includes(s.current))),
    decision: 'resync',
  },
  {
    when: "the primary's generation is the secondary's base (only the secondary wrote apart)",
    test: (p, s) => s.base !== null && s.base === p.current,
    decision: 'peerNewer',
  },
  {
    when: 'one side wrote apart from a generation the other has left too',
    test: (p, s) =>
      (p.base !== null && s.history.includes(p.base) && p.base !== s.current && p.base !== heldBefore(s)) ||
      (s.base !== null && p.history.includes(s.base) && p.current !== s.base),
    decision: 'splitBrain',
  },
  {
    when: "the secondary's generation is only in the primary's history",
    test: (p, s) => s.current !== null && p.history.includes(s.current),
    decision: 'fullOnRequest',
  },
  { when: 'nothing in common', test: () => true, decision: 'unrelated' },
];

export function decideHandshake(p: Generations, s: Generations): HandshakeDecision {
  for (const rule of HANDSHAKE_RULES) if (rule.test(p, s)) return rule.decision;
  return 'unrelated';
}

/**
 * A first write while not in step with the peer starts a history of its own: `current` moves to
 * `base` and `history`, a new id becomes `current`. Nothing changes if one is already started.
 */
export function startGeneration(g: Generations, newId: GenerationId): Generations {
  if (g.base !== null || g.current === null) {
    // A node without a generation (a replica promoted with --force before any sync) starts one
    // with no base: it shares nothing with anyone.
    return g.current === null ? { current: newId, base: null, history: g.history, resync: null } : g;
  }
  return { current: newId, base: g.current, history: pushHistory(g.history, g.current), resync: null };
}

/** Demote and --discard-local-changes: give up the history begun apart (current returns to base). */
export function giveUpGeneration(g: Generations): Generations {
  if (g.base === null) return g;
  return { current: g.base, base: null, history: g.history, resync: null };
}

/**
 * The receiver of a resync, when it begins (in the record that marks it inconsistent, durable
 * before its welcome): takes the sender's generation and remembers the one it held before.
 */
export function adoptGeneration(g: Generations, senderCurrent: GenerationId): Generations {
  if (g.current === senderCurrent) return g;
  const history = g.current === null ? g.history : pushHistory(g.history, g.current);
  return { current: senderCurrent, base: null, history, resync: g.resync ?? { from: g.current } };
}

/** The receiver, once a resync into it has ended (durably consistent). */
export function endResync(g: Generations): Generations {
  return g.resync === null ? g : { ...g, resync: null };
}

/**
 * promote --force of a replica a resync was cut off in: back to the generation it held before
 * (it has that one's data and more, not all of the sender's); one that held nothing starts a
 * history of its own.
 */
export function forcedPromotion(g: Generations, newId: () => GenerationId): Generations {
  const current = heldBefore(g);
  if (current === null) return { current: newId(), base: null, history: [], resync: null };
  return { current, base: null, history: g.history, resync: null };
}

/** The sender, once the receiver holds its generation: nothing apart any more. */
export function dropBase(g: Generations): Generations {
  return g.base === null ? g : { ...g, base: null };
}

function pushHistory(history: readonly GenerationId[], id: GenerationId): GenerationId[] {
  const out = history[history.length - 1] === id ? [...history] : [...history, id];
  return out.slice(-HISTORY_MAX);
}

/** The generations of metadata written before generations existed: one shared, derived id per volume. */
export function legacyGenerations(volumeId: string, hasData: boolean): Generations {
  return { current: hasData ? `legacy-${volumeId}` : null, base: null, history: [], resync: null };
}

/** Checks a parsed value (from a state file or the wire); undefined when it is not Generations. */
export function parseGenerations(v: unknown): Generations | undefined {
  if (typeof v !== 'object' || v === null) return undefined;
  const g = v as Record<string, unknown>;
  const id = (x: unknown) => x === null || (typeof x === 'string' && ID_PATTERN.test(x));
  if (!id(g.current) || !id(g.base)) return undefined;
  if (!Array.isArray(g.history) || g.history.length > HISTORY_MAX) return undefined;
  if (!g.history.every((h) => typeof h === 'string' && ID_PATTERN.test(h))) return undefined;
  if (g.base !== null && g.current === null) return undefined;
  let resync: Generations['resync'] = null;
  if (g.resync !== undefined && g.resync !== null) {
    if (typeof g.resync !== 'object') return undefined;
    const from = (g.resync as Record<string, unknown>).from;
    if (!id(from)) return undefined;
    resync = { from: from as string | null };
  }
  return {
    current: g.current as string | null,
    base: g.base as string | null,
    history: [...g.history],
    resync,
  };
}

/** A short form for logs and status: the first 8 hex digits. */
export function shortGeneration(id: GenerationId | null): string {
  if (id === null) return 'none';
  return id.startsWith('legacy-') ? 'legacy' : id.slice(0, 8);
}

/**
 * Why a handshake was refused, with what to run — the same words on both sides (the primary
 * logs what the secondary sent, or what it decided itself).
 */
export function describeRefusal(
  decision: HandshakeDecision,
  secondary: Generations,
  primary: Generations,
): string {
  const p = shortGeneration(primary.current);
  const s = shortGeneration(secondary.current);
  switch (decision) {
    case 'peerNewer':
      return (
        `the secondary (generation ${s}) wrote while apart and holds newer data than the primary (generation ${p}): ` +
        `replicating this way would overwrite it. Reverse the roles ('volrep demote' on the primary's side, 'volrep promote' on the ` +
        `secondary's), or throw the secondary's writes away with 'volrep secondary --discard-local-changes'`
      );
    case 'splitBrain':
      return (
        `split brain: both sides wrote while apart since generation ${shortGeneration(primary.base)} ` +
        `(primary ${p}, secondary ${s}); nothing was written. On the side whose writes are to be thrown away, ` +
        `run 'volrep secondary --discard-local-changes' (after 'volrep demote' if it is a primary)`
      );
    case 'fullOnRequest':
      return (
        `the secondary holds generation ${s}, which the primary (${p}) left behind and no longer tracks changes since: ` +
        `a full sync is needed, re-create the secondary with 'volrep create --force --secondary-of <volume id>'`
      );
    case 'unrelated':
      return (
        `the primary (generation ${p}) and the secondary (${s}) share no generation: unrelated data. ` +
        `To sync the secondary in full, re-create it with 'volrep create --force --secondary-of <volume id>'`
      );
    default:
      return `handshake decided ${decision}`;
  }
}
