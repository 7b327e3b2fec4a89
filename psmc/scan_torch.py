"""Vectorized torch scans over the time axis: log-depth, no Python loop over T.

Associative ops use a Hillis–Steele scan (each round one batched `combine` over all elements);
non-associative ops use the canonical tree level by level (Blelloch up-sweep, then down-sweep), so
T elements cost O(log T) batched `combine` calls and the result is exactly DESIGN.md's tree.
States are dicts of tensors shaped `(*batch, n, *field_shape)`; the time axis is `nb`.
"""

from __future__ import annotations

from typing import Callable

import torch

from .semantics import Counter, State

Combine = Callable[[State, State], State]


def _take(st: State, nb: int, index) -> State:
    key = (slice(None),) * nb + (index,)
    return {k: v[key] for k, v in st.items()}


def _cat(a: State, b: State, nb: int) -> State:
    return {k: torch.cat([a[k], b[k]], dim=nb) for k in a}


def _expand_like(st: State, nb: int, n: int) -> State:
    """A state without a time axis, repeated n times along a new time axis."""
    return {k: v.unsqueeze(nb).expand(v.shape[:nb] + (n,) + v.shape[nb:]) for k, v in st.items()}


def associative_scan(elements: State, start: State, combine: Combine, nb: int, n: int
                     ) -> tuple[State, State]:
    """Inclusive scan by doubling, then the start state folded in front of every prefix.

    Returns (exclusive, inclusive) prefixes: incl_i = combine(start, s_0 ∘ … ∘ s_i).
    """
    acc = elements
    d = 1
    while d < n:
        merged = combine(_take(acc, nb, slice(0, n - d)), _take(acc, nb, slice(d, n)))
        acc = _cat(_take(acc, nb, slice(0, d)), merged, nb)
        d *= 2
    incl = combine(_expand_like(start, nb, n), acc)
    excl = _cat(_expand_like(start, nb, 1), _take(incl, nb, slice(0, n - 1)), nb)
    return excl, incl


def tree_scan(elements: State, identity: State, combine: Combine, nb: int, n: int
              ) -> tuple[State, State, Counter]:
    """The canonical tree, one batched `combine` per level and direction.

    Returns (exclusive, inclusive) prefixes of the n elements and the binary-counter state after
    them, so a stream can continue exactly where this parallel pass stopped.
    """
    # Up-sweep: totals[k] holds the totals of the complete aligned blocks of size 2^k.
    totals = [elements]
    k = 0
    while (n >> (k + 1)) > 0:
        below = totals[k]
        m = n >> (k + 1)
        totals.append(combine(_take(below, nb, slice(0, 2 * m, 2)), _take(below, nb, slice(1, 2 * m, 2))))
        k += 1
    top = len(totals)  # blocks of size 2^top cover [0, n] (n + 1 positions)
    # Down-sweep over n + 1 positions: the prefix of position n is the final state P_n.
    prefix = _expand_like(identity, nb, 1)  # the root block [0, 2^top) starts with e
    for level in range(top - 1, -1, -1):
        size = 1 << level
        count = n // size + 1  # blocks at this level that start at a position <= n
        parents = prefix
        n_parents = (count + 1) // 2
        rights = count // 2  # right children: blocks 1, 3, 5, ... starting <= n
        if rights:
            left_totals = _take(totals[level], nb, slice(0, 2 * rights, 2))
            right_prefix = combine(_take(parents, nb, slice(0, rights)), left_totals)
            lefts = _take(parents, nb, slice(0, n_parents))
            prefix = _interleave(lefts, right_prefix, nb, count)
        else:
            prefix = _take(parents, nb, slice(0, count))
    excl = _take(prefix, nb, slice(0, n))
    incl = _take(prefix, nb, slice(1, n + 1))
    return excl, incl, _counter_after(totals, prefix, identity, nb, n)


def _interleave(lefts: State, rights: State, nb: int, count: int) -> State:
    """[l0, r0, l1, r1, ...] truncated to count."""
    out = {}
    for k in lefts:
        a, b = lefts[k], rights[k]
        if b.shape[nb] < a.shape[nb]:
            pad = a.narrow(nb, a.shape[nb] - 1, 1)
            b = torch.cat([b, pad], dim=nb)
        both = torch.stack([a, b], dim=nb + 1)
        out[k] = both.flatten(nb, nb + 1).narrow(nb, 0, count)
    return out


def _counter_after(totals, prefix: State, identity: State, nb: int, n: int) -> Counter:
    """The binary counter after n elements: one root per set bit of n, largest block first."""
    counter = Counter(identity=identity, count=n)
    start = 0
    for level in range(len(totals) - 1, -1, -1):
        if n >> level & 1:
            counter.roots.append((level, _take(totals[level], nb, start >> level)))
            start += 1 << level
            counter.folds.append(_take(prefix, nb, start))
    return counter
