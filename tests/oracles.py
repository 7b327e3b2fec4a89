"""Hand-written loop oracles for the ops in examples/, written from the math, not from the .psm.

Every oracle takes the op's inputs as tensors shaped (*batch, T, *field_shape) and returns
{output_name: tensor shaped (*batch, T, *out_shape)}.  Arithmetic is done in the inputs' dtype
(float64 in tests).  Loops over T are plain Python on purpose: these are the slow, obviously
correct twins of the generated kernels.

Associative ops: the left fold S_t = combine(S_{t-1}, lift(x_t)) from the identity, read out at
the inclusive prefix.  Non-associative ops: the canonical tree of DESIGN.md section 1, computed
from its definition by `canonical_prefixes`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Sequence

import torch
from torch import Tensor

State = Any  # a tensor or a dict of tensors; the tree helpers never look inside


# ---------------------------------------------------------------- helpers


def _tok(x: Tensor, t: int, rank: int) -> Tensor:
    """Token t of x shaped (*batch, T, *field) where the field has `rank` dims."""
    return x.select(x.dim() - 1 - rank, t)


def _length(x: Tensor, rank: int) -> int:
    return x.shape[x.dim() - 1 - rank]


def _batch(x: Tensor, rank: int) -> tuple:
    return tuple(x.shape[: x.dim() - 1 - rank])


def _field(x: Tensor, rank: int) -> tuple:
    return tuple(x.shape[x.dim() - rank:]) if rank else ()


def _stack(ys: Sequence[Tensor], batch: tuple, out_shape: tuple, like: Tensor,
           dtype: torch.dtype | None = None) -> Tensor:
    """Stack per-token outputs (*batch, *out) into (*batch, T, *out); T = 0 gives empty."""
    if not ys:
        return like.new_empty(*batch, 0, *out_shape, dtype=dtype or like.dtype)
    return torch.stack(list(ys), dim=len(batch))


# ---------------------------------------------------------------- canonical tree


def subtree_total(elements: Sequence[State], start: int, size: int,
                  combine: Callable[[State, State], State],
                  cache: Dict | None = None) -> State:
    """T(block) for the aligned block [start, start + size), size a power of two:
    T([s_j]) = s_j;  T(block) = combine(T(left half), T(right half))."""
    if cache is not None and (start, size) in cache:
        return cache[(start, size)]
    if size == 1:
        total = elements[start]
    else:
        half = size // 2
        total = combine(subtree_total(elements, start, half, combine, cache),
                        subtree_total(elements, start + half, half, combine, cache))
    if cache is not None:
        cache[(start, size)] = total
    return total


def canonical_prefixes(elements: Sequence[State],
                       combine: Callable[[State, State], State],
                       identity: State) -> List[State]:
    """The canonical prefixes of DESIGN.md section 1.

    Returns P of length N + 1: P[i] is the exclusive prefix of element i (P[0] = identity) and
    P[i + 1] its inclusive prefix.  For i >= 1, [0, i) splits into aligned blocks B_1, B_2, ...
    (the set bits of i, high to low) and
        P_i = combine(...combine(combine(e, T(B_1)), T(B_2))..., T(B_m)).
    The leading combine(e, .) is kept literally: it matters when e is not an exact identity
    (e.g. extern aggregators).
    """
    n = len(elements)
    cache: Dict = {}
    prefixes: List[State] = [identity]
    for i in range(1, n + 1):
        acc = identity
        start = 0
        for k in reversed(range(i.bit_length())):
            if i >> k & 1:
                size = 1 << k
                acc = combine(acc, subtree_total(elements, start, size, combine, cache))
                start += size
        assert start == i
        prefixes.append(acc)
    return prefixes


def canonical_inclusive(elements, combine, identity) -> List[State]:
    """Inclusive prefixes: element i gets P_{i+1}."""
    return canonical_prefixes(elements, combine, identity)[1:]


def canonical_exclusive(elements, combine, identity) -> List[State]:
    """Exclusive prefixes: element i gets P_i."""
    return canonical_prefixes(elements, combine, identity)[:-1]


# ---------------------------------------------------------------- associative ops


def cumsum(x: Tensor) -> Dict[str, Tensor]:
    """s_t = s_{t-1} + x_t, s = 0 initially; y = s."""
    B = _batch(x, 0)
    s = x.new_zeros(B)
    ys = []
    for t in range(_length(x, 0)):
        s = s + _tok(x, t, 0)
        ys.append(s)
    return {"y": _stack(ys, B, (), x)}


def cummax(x: Tensor) -> Dict[str, Tensor]:
    """m_t = max(m_{t-1}, x_t), m = -inf initially; y = m."""
    B = _batch(x, 0)
    m = x.new_full(B, -math.inf)
    ys = []
    for t in range(_length(x, 0)):
        m = torch.maximum(m, _tok(x, t, 0))
        ys.append(m)
    return {"y": _stack(ys, B, (), x)}


def logcumsumexp(x: Tensor) -> Dict[str, Tensor]:
    """y_t = log sum_{j<=t} exp(x_j), carried as (running max m, z = sum_j exp(x_j - m))."""
    B = _batch(x, 0)
    m = x.new_full(B, -math.inf)
    z = x.new_zeros(B)
    ys = []
    for t in range(_length(x, 0)):
        xt = _tok(x, t, 0)
        m_new = torch.maximum(m, xt)
        z = z * torch.exp(m - m_new) + torch.exp(xt - m_new)   # exp(-inf) = 0 at t = 0
        m = m_new
        ys.append(m + torch.log(z))
    return {"y": _stack(ys, B, (), x)}


def linrec(a: Tensor, b: Tensor) -> Dict[str, Tensor]:
    """h_t = a_t h_{t-1} + b_t, h = 0 initially; y = h."""
    B = _batch(b, 0)
    h = b.new_zeros(B)
    ys = []
    for t in range(_length(b, 0)):
        h = _tok(a, t, 0) * h + _tok(b, t, 0)
        ys.append(h)
    return {"y": _stack(ys, B, (), b)}


def rotation(theta: Tensor, bre: Tensor, bim: Tensor) -> Dict[str, Tensor]:
    """h_t = R(theta_t) h_{t-1} + b_t, h = (re, im) = 0 initially, R the 2-D rotation matrix."""
    B = _batch(bre, 0)
    hr, hi = bre.new_zeros(B), bre.new_zeros(B)
    yre, yim = [], []
    for t in range(_length(bre, 0)):
        c, s = torch.cos(_tok(theta, t, 0)), torch.sin(_tok(theta, t, 0))
        hr, hi = (c * hr - s * hi + _tok(bre, t, 0),
                  s * hr + c * hi + _tok(bim, t, 0))
        yre.append(hr)
        yim.append(hi)
    return {"yre": _stack(yre, B, (), bre), "yim": _stack(yim, B, (), bre)}


def affine(A: Tensor, b: Tensor) -> Dict[str, Tensor]:
    """h_t = A_t h_{t-1} + b_t (matrix times vector), h = 0 initially; y = h."""
    B, F = _batch(b, 1), _field(b, 1)
    h = b.new_zeros(B + F)
    ys = []
    for t in range(_length(b, 1)):
        h = (_tok(A, t, 2) @ h[..., :, None])[..., 0] + _tok(b, t, 1)
        ys.append(h)
    return {"y": _stack(ys, B, F, b)}


def softmax_attn(score: Tensor, v: Tensor) -> Dict[str, Tensor]:
    """y_t = sum_{j<=t} exp(score_j) v_j / sum_{j<=t} exp(score_j), online with a running max."""
    B, F = _batch(v, 1), _field(v, 1)
    m = v.new_full(B, -math.inf)
    z = v.new_zeros(B)
    o = v.new_zeros(B + F)
    ys = []
    for t in range(_length(v, 1)):
        st = _tok(score, t, 0)
        m_new = torch.maximum(m, st)
        alpha = torch.exp(m - m_new)                            # 0 at t = 0
        beta = torch.exp(st - m_new)
        z = alpha * z + beta
        o = alpha[..., None] * o + beta[..., None] * _tok(v, t, 1)
        m = m_new
        ys.append(o / z[..., None])
    return {"y": _stack(ys, B, F, v)}


def gla(q: Tensor, k: Tensor, v: Tensor, gk: Tensor) -> Dict[str, Tensor]:
    """S_t = diag(exp(gk_t)) S_{t-1} + k_t v_t^T, S = 0 initially; o_t = q_t^T S_t."""
    B, K, V = _batch(v, 1), k.shape[-1], v.shape[-1]
    S = v.new_zeros(B + (K, V))
    outs = []
    for t in range(_length(v, 1)):
        kt, vt = _tok(k, t, 1), _tok(v, t, 1)
        S = torch.exp(_tok(gk, t, 1))[..., :, None] * S + kt[..., :, None] * vt[..., None, :]
        outs.append((_tok(q, t, 1)[..., None, :] @ S)[..., 0, :])
    return {"o": _stack(outs, B, (V,), v)}


def mlstm(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor) -> Dict[str, Tensor]:
    """Stabilized mLSTM (xLSTM) recurrence, with the stabilizer m starting at -inf:
        m_t = max(f_t + m_{t-1}, i_t)
        C_t = exp(f_t + m_{t-1} - m_t) C_{t-1} + exp(i_t - m_t) k_t v_t^T   (n_t likewise, with k_t)
        h_t = q_t^T C_t / max(|q_t . n_t|, exp(-m_t))
    Equal to `mlstm_unstabilized` up to rounding."""
    B, K, V = _batch(v, 1), k.shape[-1], v.shape[-1]
    C = v.new_zeros(B + (K, V))
    n = v.new_zeros(B + (K,))
    m = v.new_full(B, -math.inf)
    hs = []
    for t in range(_length(v, 1)):
        it, ft = _tok(i, t, 0), _tok(f, t, 0)
        qt, kt, vt = _tok(q, t, 1), _tok(k, t, 1), _tok(v, t, 1)
        m_new = torch.maximum(ft + m, it)
        a = torch.exp(ft + m - m_new)                           # 0 at t = 0
        b = torch.exp(it - m_new)
        C = a[..., None, None] * C + b[..., None, None] * (kt[..., :, None] * vt[..., None, :])
        n = a[..., None] * n + b[..., None] * kt
        m = m_new
        num = (qt[..., None, :] @ C)[..., 0, :]
        den = torch.maximum((qt * n).sum(-1).abs(), torch.exp(-m))
        hs.append(num / den[..., None])
    return {"h": _stack(hs, B, (V,), v)}


def mlstm_unstabilized(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor
                       ) -> Dict[str, Tensor]:
    """Textbook mLSTM without the stabilizer (safe in float64 for the declared ranges):
    C_t = exp(f_t) C_{t-1} + exp(i_t) k_t v_t^T, n_t likewise, h_t = q_t^T C_t / max(|q_t.n_t|, 1).
    A cross-check for `mlstm`, not in ORACLES."""
    B, K, V = _batch(v, 1), k.shape[-1], v.shape[-1]
    C = v.new_zeros(B + (K, V))
    n = v.new_zeros(B + (K,))
    hs = []
    for t in range(_length(v, 1)):
        fg, ig = torch.exp(_tok(f, t, 0)), torch.exp(_tok(i, t, 0))
        qt, kt, vt = _tok(q, t, 1), _tok(k, t, 1), _tok(v, t, 1)
        C = fg[..., None, None] * C + ig[..., None, None] * (kt[..., :, None] * vt[..., None, :])
        n = fg[..., None] * n + ig[..., None] * kt
        num = (qt[..., None, :] @ C)[..., 0, :]
        den = torch.clamp((qt * n).sum(-1).abs(), min=1.0)
        hs.append(num / den[..., None])
    return {"h": _stack(hs, B, (V,), v)}


def s5(P: Tensor) -> Dict[str, Tensor]:
    """M_t = M_{t-1} @ P_t (row vectors: P_0 acts first), M = eye initially; y = M."""
    B, F = _batch(P, 2), _field(P, 2)
    M = torch.eye(F[0], dtype=P.dtype, device=P.device).expand(B + F).clone()
    ys = []
    for t in range(_length(P, 2)):
        M = M @ _tok(P, t, 2)
        ys.append(M)
    return {"y": _stack(ys, B, F, P)}


def cumcount(x: Tensor) -> Dict[str, Tensor]:
    """npos_t = #{j <= t : x_j > 0}, total_t = sum_{j<=t} x_j, both int64."""
    B = _batch(x, 0)
    c = x.new_zeros(B, dtype=torch.int64)
    s = x.new_zeros(B, dtype=torch.int64)
    npos, total = [], []
    for t in range(_length(x, 0)):
        xt = _tok(x, t, 0)
        c = c + (xt > 0).to(torch.int64)
        s = s + xt.to(torch.int64)
        npos.append(c)
        total.append(s)
    return {"npos": _stack(npos, B, (), x, torch.int64),
            "total": _stack(total, B, (), x, torch.int64)}


# ---------------------------------------------------------------- non-associative ops


def nonassoc_mix(u: Tensor) -> Dict[str, Tensor]:
    """Canonical-tree prefixes of combine(l, r) = (l.n + r.n, tanh(l.h + r.h)), the count n
    making (n = 0, h = 0) an exact identity; y = h of the inclusive prefix."""

    def combine(l, r):
        ln, rn = l["n"][..., None], r["n"][..., None]
        h = torch.where(ln == 0, r["h"],
                        torch.where(rn == 0, l["h"], torch.tanh(l["h"] + r["h"])))
        return {"n": l["n"] + r["n"], "h": h}

    B, F = _batch(u, 1), _field(u, 1)
    identity = {"n": u.new_zeros(B), "h": u.new_zeros(B + F)}
    elements = [{"n": u.new_ones(B), "h": _tok(u, t, 1)} for t in range(_length(u, 1))]
    incl = canonical_inclusive(elements, combine, identity)
    return {"y": _stack([p["h"] for p in incl], B, F, u)}


def softmax_agg(score: Tensor, v: Tensor) -> Dict[str, Tensor]:
    """Canonical-tree prefixes of the blend
        a = sigmoid(l.w - r.w),  h = a l.h + (1 - a) r.h,  w = max(l.w, r.w),  n = l.n + r.n
    (h guarded by the count n for an exact identity; w's identity is -inf); y = h of the
    inclusive prefix."""

    def combine(l, r):
        a = torch.sigmoid(l["w"] - r["w"])[..., None]
        ln, rn = l["n"][..., None], r["n"][..., None]
        blend = a * l["h"] + (1 - a) * r["h"]
        h = torch.where(ln == 0, r["h"], torch.where(rn == 0, l["h"], blend))
        return {"n": l["n"] + r["n"], "w": torch.maximum(l["w"], r["w"]), "h": h}

    B, F = _batch(v, 1), _field(v, 1)
    identity = {"n": v.new_zeros(B), "w": v.new_full(B, -math.inf), "h": v.new_zeros(B + F)}
    elements = [{"n": v.new_ones(B), "w": _tok(score, t, 0), "h": _tok(v, t, 1)}
                for t in range(_length(v, 1))]
    incl = canonical_inclusive(elements, combine, identity)
    return {"y": _stack([p["h"] for p in incl], B, F, v)}


def tpsm(u: Tensor, *, enc: Callable, agg: Callable, inf: Callable, C: int = 16
         ) -> Dict[str, Tensor]:
    """Transformer-PSM.  u: (*batch, T, D).  T is padded with zero tokens to a multiple of C;
    chunk j's state is enc(u_j), u_j: (*batch, C, D); P_j is the canonical exclusive prefix under
    agg, from the identity h = 0 of shape (*batch, C, D); y_j = inf(P_j, u_j); the chunks'
    outputs are concatenated along T and trimmed back to T.  Externs get (*batch, C, D) tensors."""
    B, (T, D) = _batch(u, 1), u.shape[-2:]
    nchunks = -(-T // C)
    pad = nchunks * C - T
    if pad:
        u = torch.cat([u, u.new_zeros(B + (pad, D))], dim=-2)
    chunks = [u[..., j * C:(j + 1) * C, :] for j in range(nchunks)]
    elements = [enc(c) for c in chunks]
    identity = u.new_zeros(B + (C, D))
    excl = canonical_exclusive(elements, agg, identity)
    ys = [inf(p, c) for p, c in zip(excl, chunks)]
    if not ys:
        return {"y": u.new_empty(B + (0, D))}
    return {"y": torch.cat(ys, dim=-2)[..., :T, :]}


ORACLES: Dict[str, Callable[..., Dict[str, Tensor]]] = {
    "cumsum": cumsum,
    "cummax": cummax,
    "logcumsumexp": logcumsumexp,
    "linrec": linrec,
    "rotation": rotation,
    "affine": affine,
    "softmax_attn": softmax_attn,
    "gla": gla,
    "mlstm": mlstm,
    "s5": s5,
    "nonassoc_mix": nonassoc_mix,
    "softmax_agg": softmax_agg,
    "tpsm": tpsm,
    "cumcount": cumcount,
}
