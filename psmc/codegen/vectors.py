"""Small fields moved as vectors: a token's 2 or 4 contiguous scalars in one load or store.

A load per scalar of a [2, 2] matrix field reads 4 strided words per token; one 16-byte load
reads them at once (LDG.E.128) and the scalars are split apart in registers, where they stay in the
same thread. Used by the tree kernels' lanes family and the scan kernels (triton_scan.py). The
split and join are halvings (`tl.split` / `tl.join` work on a last axis of 2).
"""

from __future__ import annotations


def groups(size: int) -> list[tuple[int, int]]:
    """(first scalar, count) of the vectors a field of `size` scalars is moved in: 4, 2 or 1."""
    out, k = [], 0
    while k < size:
        g = 4 if size - k >= 4 else 2 if size - k >= 2 else 1
        out.append((k, g))
        k += g
    return out


def unpack(src: str, cols: list[str], lead: str) -> list[str]:
    """`cols[c] = src[..., c]` for a [*lead, len(cols)] tensor, by halving splits (evens, odds);
    `lead` is the leading shape as text ("R", "BLOCK_L, BLOCK_T")."""
    g = len(cols)
    if g == 1:
        return [f"{cols[0]} = tl.reshape({src}, [{lead}])"]
    lines = [f"{src}e, {src}o = tl.split(tl.reshape({src}, [{lead}, {g // 2}, 2]))"]
    return lines + unpack(f"{src}e", cols[0::2], lead) + unpack(f"{src}o", cols[1::2], lead)


def pack(cols: list[str], lead: str) -> str:
    """The [*lead, len(cols)] tensor whose last index c is cols[c] (the inverse of `unpack`)."""
    g = len(cols)
    if g == 1:
        return f"tl.reshape({cols[0]}, [{lead}, 1])"
    return f"tl.reshape(tl.join({pack(cols[0::2], lead)}, {pack(cols[1::2], lead)}), [{lead}, {g}])"
