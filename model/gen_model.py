#!/usr/bin/env python3
"""Exhaustive check of the generation handshake sketched in DESIGN.md §7 (two nodes, a few regions).

Ground truth: each node holds, per region, the id of the write whose bytes it has (0 = initial).
A write made on a node while apart from its peer is *kept* until that node gives it up (demote,
discard); a write made in step but not yet acked is the tail a failover may lose. The handshake must
never overwrite a kept write that the other side lacks, never leave a differing region unsent, and
must report a split brain exactly when both sides hold kept writes the other lacks.

Usage: gen_model.py [--depth N] [--regions R] [--writes W] [--flag NAME ...] [--dump-cases FILE]
Flags drop or change one rule to show it is needed (see FLAGS). --dump-cases writes every distinct
handshake the exploration met (both sides' generations and the decision) as JSON, for the code's
own table to be tested against (test/replication/generations.test.ts).

Beyond DESIGN.md §7 as first checked, this copy models (volrep issue 9):
- promote --force of a replica marked inconsistent (mid-resync): it becomes a primary with the
  generation it had before the resync (it takes the sender's only at the end) and keeps its dirty
  set; the regions the interrupted resync still owed stay dirty on the old primary. Its data is
  no state the old primary ever had, so when the old primary wrote anything after their common
  generation the two have diverged: a split brain there is the right verdict, not a false one (the
  node is marked `forced` until a resync into it ends: giving up its history does not undo the mix). With the
  receiver taking the generation at the start (--flag gen_at_start), a forced replica that never
  wrote would overwrite the old primary's writes made apart: that flag is no longer harmless;
- power loss in the middle of a role change: promote, demote and discard each write the new
  role's state first and commit with one atomic step (meta.json's rename); a power loss before
  it leaves the node as it was, down (the 'crash' successor), after it the whole change.
  --flag demote_not_atomic models a demote whose generation change is durable before the role
  change commits: the node comes back as a primary that gave up its history but not its role."""
import argparse, collections, itertools, sys

FLAGS = {
    'no_rotate': 'a primary writing without its peer does not draw a new generation',
    'eager_rotate_on_promote': 'promotion draws a new generation at once (not at its first write)',
    'rotate_on_demote': 'demote draws a new generation',
    'no_union': "resync sends only the sender's set, not the receiver's own unacked set",
    'no_split_rule': 'skip the split-brain rule',
    'no_reverse_split': 'the split-brain rule looks only at the sender having written apart',
    'no_cut_resync_rule': 'a receiver whose resync was cut off is not resynced by a sender back at its old generation',
    'no_cut_receiver_rule': 'a receiver whose resync was cut off is judged like one that may have written',
    'no_resync_from': 'judge a receiver whose resync was cut off by the generation it took, not the one it had',
    'gen_at_end': 'the receiver of a resync takes the sender\'s generation when the resync ends, the sender drops its base on that ack',
    'force_keeps_adopted': 'promote --force keeps the generation taken at the start of the cut-off resync',
    'demote_keeps_gen': 'demote keeps a generation drawn while apart (does not return to its base)',
    'demote_not_atomic': 'a power loss during demote keeps the given-up generation but not the new role',
    'force_promote_clears_dirty': 'promote --force of an inconsistent replica forgets its dirty set',
}

Node = collections.namedtuple('Node', 'role alive current base history dirty data kept seen inconsistent forced resync_from')
# role: 'P' or 'S'; current/base: generation ids (base None when not tracking); history: tuple of gens
# dirty: frozenset of regions written since base (or unacked); data: tuple of write ids per region
# kept: frozenset of write ids this node has not given up (writes it made as primary)
# seen: every write id this node has held (a newer write by a node that had seen w supersedes w)
# inconsistent: a resync into this node began and has not ended (durable mark)
# forced: promoted with --force while inconsistent; its data is no state its peer ever had
# resync_from: while inconsistent, the generation this node held before the resync began
State = collections.namedtuple('State', 'a b link nextgen nextwrite changed')
# link: None (apart) or ('A'|'B') = direction of an established, in-step pair (sender)
# changed: an operator changed a role (promote, demote, start as secondary, discard) at some point


def initial(regions):
    a = Node('P', True, 1, None, (), frozenset(), (0,) * regions, frozenset(), frozenset(), False, False, None)
    b = Node('S', True, 1, None, (), frozenset(), (0,) * regions, frozenset(), frozenset(), False, False, None)
    return State(a, b, 'A', 2, 1, False)


def get(s, n):
    return s.a if n == 'A' else s.b


def put(s, n, node):
    return s._replace(a=node) if n == 'A' else s._replace(b=node)


def other(n):
    return 'B' if n == 'A' else 'A'


def rotate(node, s, why_ok=True):
    """Start a new history: current -> base (if not already tracking) and history."""
    if node.base is not None:
        return node, s
    node = node._replace(base=node.current, history=node.history + (node.current,), current=s.nextgen)
    return node, s._replace(nextgen=s.nextgen + 1)


def decide(p, q, flags):
    """Handshake: p would send to q. Returns ('resync', set) | ('refuse-newer',) | ('split',) | ('full',) | ('unrelated',).

    A receiver whose resync was cut off holds its old generation's data plus some of the sender's,
    nothing of its own: for ancestry it counts as the generation it had before (resync_from)."""
    both = p.dirty | (frozenset() if 'no_union' in flags else q.dirty)
    if p.current == q.current:
        return ('resync', both)
    qc = q.resync_from if (q.resync_from is not None and 'no_resync_from' not in flags) else q.current
    if p.base is not None and p.base in (q.current, qc):
        return ('resync', both)
    if qc == p.current and 'no_cut_resync_rule' not in flags:  # the sender is where the receiver was
        return ('resync', both)
    # A receiver a resync was cut off in has no writes of its own to lose (it has not written
    # since, or it would have been promoted, which ends that state); the sender's dirty set covers
    # what it has not sent of its line.
    if (q.resync_from is not None and 'no_cut_receiver_rule' not in flags
            and (qc in p.history or q.current in p.history)):
        return ('resync', both)
    if q.base is not None and q.base == p.current:
        return ('refuse-newer',)
    # Split brain: one side wrote apart from a generation that the other has left too (it wrote
    # apart from it as well, or came back to it from a promotion with --force, or moved on).
    if 'no_split_rule' not in flags:
        if p.base is not None and p.base in q.history and p.base not in (q.current, qc):
            return ('split',)
        if 'no_reverse_split' not in flags and q.base is not None and q.base in p.history and p.current != q.base:
            return ('split',)
    if q.current in p.history:
        return ('full',)
    return ('unrelated',)


def truths(s, regions):
    """Kept writes each side holds that the other lacks (by region)."""
    out = {}
    for n in 'AB':
        me, you = get(s, n), get(s, other(n))
        out[n] = {r for r in range(regions) if me.data[r] != you.data[r] and me.data[r] in me.kept
                  and me.data[r] not in you.seen}
    return out


def check_handshake(s, sender, dec, regions):
    """Returns a violation string or None."""
    p, q = get(s, sender), get(s, other(sender))
    t = truths(s, regions)
    lose_q = t[other(sender)]          # kept writes on the receiver that a resync would overwrite
    lose_p = t[sender]
    differ = {r for r in range(regions) if p.data[r] != q.data[r]}
    if dec[0] == 'resync':
        if lose_q:
            return f'resync {sender}->{other(sender)} overwrites kept writes in regions {sorted(lose_q)}'
        missed = differ - dec[1]
        if missed:
            return f'resync {sender}->{other(sender)} leaves differing regions {sorted(missed)} unsent'
    if dec[0] == 'split' and not (lose_p and lose_q) and not (p.forced or q.forced):
        return f'false split brain (kept-only-here: {sender}={sorted(lose_p)} {other(sender)}={sorted(lose_q)})'
    if dec[0] != 'split' and lose_p and lose_q:
        return f'missed split brain: decided {dec[0]}'
    if dec[0] != 'resync' and not s.changed:
        return f'refused ({dec[0]}) though no role ever changed: crashes and link drops alone must never need the operator'
    return None


def successors(s, regions, max_writes, flags):
    for n in 'AB':
        me = get(s, n)
        o = other(n)
        you = get(s, o)
        # a write on a live primary
        if me.alive and me.role == 'P' and s.nextwrite <= max_writes:
            for r in range(regions):
                w = s.nextwrite
                t = s._replace(nextwrite=w + 1)
                # A write made while apart starts a history of its own: it is *kept* until given up.
                # One made while in step and not yet acked is the tail that a failover may lose (RPO).
                apart = t.link != n
                node = me._replace(data=me.data[:r] + (w,) + me.data[r + 1:], kept=me.kept | ({w} if apart else set()),
                                   dirty=me.dirty | {r}, seen=me.seen | {w})
                if t.link != n and 'no_rotate' not in flags:
                    node, t = rotate(node, t)
                yield f'write {n} r{r} w{w}', put(t, n, node), None
        # replicate + ack one dirty region along an established link
        if s.link == n and me.alive and you.alive:
            for r in sorted(me.dirty | you.dirty):
                y = you._replace(data=you.data[:r] + (me.data[r],) + you.data[r + 1:], seen=you.seen | {me.data[r]},
                                 dirty=you.dirty - {r})
                m = me._replace(dirty=me.dirty - {r})
                yield f'ack {n}->{o} r{r}', put(put(s, n, m), o, y), None
            if you.inconsistent and not me.dirty and not you.dirty:
                y = you._replace(inconsistent=False, forced=False, resync_from=None,
                                 kept=frozenset(w for w in you.kept if w in me.seen))
                if 'gen_at_end' in flags:  # the receiver takes the generation only now
                    y = y._replace(current=me.current, base=None, history=you.history + (you.current,))
                m = me
                t = put(put(s, n, m), o, y)
                bad = None if t.a.data == t.b.data else f'after resync {n}->{o} the volumes differ: {t.a.data} vs {t.b.data}'
                yield f'resync-end {n}->{o}', t, bad
        # gen_at_end: the ack of a resync's end reaches the sender, which drops its base then
        if ('gen_at_end' in flags and s.link == n and me.alive and you.alive and me.base is not None
                and not you.inconsistent and you.current == me.current):
            yield f'base-drop {n}', put(s, n, me._replace(base=None)), None
        # crash of a node (power loss: its durable dirty set, gens survive; the link drops)
        if me.alive:
            yield f'crash {n}', put(s._replace(link=None if s.link else None), n, me._replace(alive=False)), None
        if not me.alive:
            yield f'restart {n}', put(s, n, me._replace(alive=True)), None
        # link drop
        if s.link is not None and n == 'A':
            yield 'disconnect', s._replace(link=None), None
        # promote a secondary that is apart (stopped or cut off)
        if me.role == 'S' and s.link is None and not me.inconsistent:
            node = me._replace(role='P')
            t = s
            # No new generation yet: it draws one at its first write (lazily, like a primary apart),
            # so a promotion that never wrote cannot look like a split brain. Dirty regions stay.
            if 'eager_rotate_on_promote' in flags:
                node, t = rotate(node, t)
            yield f'promote {n}', put(t._replace(changed=True), n, node), None
        # promote --force of a replica a resync was cut off in: not a state the old primary had
        if me.role == 'S' and s.link is None and me.inconsistent:
            node = me._replace(role='P', inconsistent=False, forced=True, resync_from=None)
            if me.resync_from is not None and 'force_keeps_adopted' not in flags:
                # back to the generation it held before the cut-off resync: it has that one's data
                # (and more), not all of the sender's
                node = node._replace(current=me.resync_from)
            if 'force_promote_clears_dirty' in flags:
                node = node._replace(dirty=frozenset())
            yield f'promote --force {n}', put(s._replace(changed=True), n, node), None
        # demote a primary that is apart: it gives up its writes the peer lacks
        if me.role == 'P' and s.link is None:
            node = me._replace(role='S', kept=frozenset(w for w in me.kept if w in you.seen))
            if node.base is not None and 'demote_keeps_gen' not in flags:
                node = node._replace(current=node.base, base=None)  # give up the history it began apart
            t = s
            if 'rotate_on_demote' in flags:
                node, t = rotate(node, t)
            yield f'demote {n}', put(t._replace(changed=True), n, node), None
            if 'demote_not_atomic' in flags and node.current != me.current:
                # power loss after the generation was given up, before the role changed
                half = me._replace(alive=False, current=node.current, base=None)
                yield f'demote {n} cut by power loss', put(s._replace(link=None), n, half), None
        # an old primary started as secondary without demote: it gives up nothing
        if me.role == 'P' and s.link is None:
            yield f'as-secondary {n}', put(s._replace(changed=True), n, me._replace(role='S')), None
        # discard local changes on a secondary that is apart
        if me.role == 'S' and s.link is None and me.base is not None:
            node = me._replace(current=me.base, base=None, kept=frozenset(w for w in me.kept if w in you.seen))
            yield f'discard {n}', put(s._replace(changed=True), n, node), None
        # handshake: n primary, o secondary, both alive, apart
        if s.link is None and me.alive and you.alive and me.role == 'P' and you.role == 'S':
            dec = decide(me, you, flags)
            bad = check_handshake(s, n, dec, regions)
            if dec[0] == 'resync':
                # The resync runs region by region (acks above); the receiver is marked inconsistent
                # until it ends. It takes the sender's generation now, in the record that marks it
                # inconsistent (durable before its welcome), remembering the one it had; the sender
                # drops its base once the welcome shows it, before anything is streamed.
                both = me.dirty | you.dirty if 'no_union' not in flags else me.dirty
                y = you._replace(inconsistent=True, dirty=you.dirty if 'no_union' not in flags else frozenset())
                m = me
                if 'gen_at_end' not in flags and you.current != me.current:
                    y = y._replace(current=me.current, base=None, history=you.history + (you.current,),
                                   resync_from=you.resync_from if you.resync_from is not None else you.current)
                    # the connection may die after the receiver's record, before the sender's drop
                    yield (f'handshake {n}->{o}: resync {sorted(both)} cut before the sender drops its base',
                           put(s, o, y), bad)
                if 'gen_at_end' not in flags and y.current == me.current:
                    m = me._replace(base=None)  # the receiver holds this side's generation
                t = put(put(s._replace(link=n), n, m), o, y)
                yield f'handshake {n}->{o}: resync {sorted(both)}', t, bad
            else:
                yield f'handshake {n}->{o}: {dec[0]}', s, bad


def gens(node):
    return {'current': node.current, 'base': node.base, 'history': list(node.history), 'resync_from': node.resync_from}


def explore(depth, regions, max_writes, flags, cases=None):
    start = initial(regions)
    seen = {start: None}
    frontier = [start]
    decisions = collections.Counter()
    for d in range(depth):
        nxt = []
        for s in frontier:
            for label, t, bad in successors(s, regions, max_writes, flags):
                if label.startswith('handshake'):
                    decisions[label.split(': ')[1].split(' ')[0]] += 1
                    if cases is not None:
                        sender = label.split(' ')[1][0]
                        p, q = get(s, sender), get(s, other(sender))
                        key = (p.current, p.base, p.history, p.resync_from, q.current, q.base, q.history, q.resync_from)
                        if key not in cases:
                            cases[key] = {'primary': gens(p), 'secondary': gens(q),
                                          'decision': decide(p, q, flags)[0]}
                if bad is None:
                    differ = {r for r in range(regions) if t.a.data[r] != t.b.data[r]}
                    lost = differ - (t.a.dirty | t.b.dirty)
                    if lost:
                        bad = f'regions {sorted(lost)} differ and neither side has them dirty'
                if bad:
                    trace = [label]
                    x = s
                    while seen[x] is not None:
                        prev, lab = seen[x]
                        trace.append(lab)
                        x = prev
                    return bad, list(reversed(trace)), len(seen), decisions
                if t not in seen:
                    seen[t] = (s, label)
                    nxt.append(t)
        frontier = nxt
        if not frontier:
            break
    return None, None, len(seen), decisions


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--depth', type=int, default=9)
    ap.add_argument('--regions', type=int, default=2)
    ap.add_argument('--writes', type=int, default=3)
    ap.add_argument('--flag', action='append', default=[], choices=sorted(FLAGS))
    ap.add_argument('--dump-cases', metavar='FILE')
    a = ap.parse_args()
    cases = {} if a.dump_cases else None
    bad, trace, n, dec = explore(a.depth, a.regions, a.writes, set(a.flag), cases)
    if cases is not None:
        import json
        with open(a.dump_cases, 'w') as f:
            rows = sorted(json.dumps(c, separators=(', ', ': ')) for c in cases.values())
            f.write('[\n' + ',\n'.join(f'  {r}' for r in rows) + '\n]\n')
        print(f'{len(cases)} distinct handshakes written to {a.dump_cases}')
    print(f'states {n}, depth {a.depth}, regions {a.regions}, writes {a.writes}, flags {a.flag or "none"}')
    print('handshake decisions seen:', dict(dec))
    if bad:
        print('VIOLATION:', bad)
        for step in trace:
            print('  ', step)
        sys.exit(1)
    print('no violation')


if __name__ == '__main__':
    main()
