"""Exact k-NN with a bf16 prefilter: a cheap low-precision GEMM plus a rigorous error bound shortlists
candidates, which are then ranked in fp32 like ``search.knn``.

Why: on CPUs with native bf16 dot products (x86 ``avx512_bf16`` / ``amx_bf16``), oneDNN runs a bf16 GEMM
several times faster than the fp32 one that dominates ``knn``. A bf16 distance is only accurate to about
1% of the norms involved, but nearest-neighbour distances of real patch features stand well apart at that
scale, so a provable bound leaves only a few candidates per query (about 2-5 on the real
EfficientNet-Lite0 bank, see benchmarks/knn_bench.py), which are then computed exactly.

The result is what ``ExactIndex`` returns: the same indices (up to ties at fp32 rounding level) and the
same distances up to fp32 rounding, because the shortlist provably contains every bank row that an fp32
evaluation of ``knn`` could rank among the k nearest.

Error bound (the derivation that ``_bound_terms`` implements). Notation: u = 2^-8 (bf16 unit roundoff,
round to nearest), v = 2^-24 (fp32), gamma_n = n v / (1 - n v) (the classic bound for an n-term fp32 sum,
any order, with or without FMA: |fl(sum t_i) - sum t_i| <= gamma_n sum |t_i|). mu is the (fp32) bank mean;
distances are translation invariant, so for exact x = q - mu, y = b - mu we have d = |x|^2 + |y|^2 - 2 x.y.

1. Inputs. x^ = fl32(q - mu) = x (1 + e), |e| <= v, then x~ = bf16(x^) = x^ (1 + e'), |e'| <= u, so every
   element x~_i = x_i (1 + a_i) with |a_i| <= u1 = u + v + u v (same for y~). Scaling by -2 is exact.
2. Products x~_i y~_i of two bf16 numbers are exact in fp32 (8 + 8 significand bits <= 24), so
   |sum_i x~_i y~_i - x.y| <= ((1 + u1)^2 - 1) sum_i |x_i y_i| <= c1 |x| |y|, c1 = 2 u1 + u1^2 (Cauchy-Schwarz).
3. Norms ride inside the GEMM as extra columns: the query row is [-2 x~, 1, 1, nx_hi, nx_lo], the bank row
   [y~, ny_hi, ny_lo, 1, 1], where ny = fl32(|y^|^2) (|ny - |y|^2| <= gamma_{D+2} |y|^2), ny_hi = bf16(ny)
   and ny_lo = bf16(ny - ny_hi) (that difference is exact in fp32), so ny_hi + ny_lo = ny (1 + t), |t| <= u^2.
   The exact sum of the D + 4 products is S with |S - d| <= 2 c1 |x||y| + c2 (|x|^2 + |y|^2),
   c2 = (1 + gamma_{D+2})(1 + u^2) - 1.
4. The GEMM accumulates those n = D + 4 exact products in fp32 (oneDNN's bf16 kernels do; checked at run
   time by ``_kernel_self_check``): |acc - S| <= gamma_n (2 (1 + c1) |x||y| + (1 + c2)(|x|^2 + |y|^2)).
5. The output is rounded to bf16 once: d~ = acc (1 + h), |h| <= u, hence |d~ - acc| <= u |d~| / (1 - u).
   So |d~ - d| <= u |d~| / (1 - u) + G with G = 2 (c1 + gamma_n (1 + c1)) |x| |y| + (c2 + gamma_n (1 + c2))
   (|x|^2 + |y|^2), which we make uniform over the bank by replacing |y| with B >= max_j |y_j|.
6. knn itself evaluates d in fp32 as |q|^2 + (|b|^2 - 2 q.b): its value f_j has |f_j - d_j| <= E32 =
   gamma_{D+3} (|q| + max_j |b_j|)^2. Any row knn (or our fp32 rerank) ranks among the k nearest has
   d_j <= d_(k) + 2 E32, where d_(k) is the exact k-th smallest distance.
7. Threshold. For any k distinct rows S, d_(k) <= T0 = max_{j in S} (d~_j + u |d~_j| / (1 - u)) + G; we take
   S = the k smallest d~. A row j may matter only if its lower bound d~_j (1 - u / (1 - u)) - G (for
   d~_j >= 0; rows with d~_j < 0 are always kept) is <= T0 + 2 E32, i.e. d~_j <= T1 = (T0 + 2 E32 + G) /
   (1 - u / (1 - u)). T1 >= 0 is computed in float64, its bound terms are inflated by 0.1% to swamp the
   rounding of the bound arithmetic itself, and it is rounded up to bf16. For T1 >= 0 the test d~ <= T1
   is an int16 comparison of the bf16 bit patterns (negative d~, including -0, have negative patterns).
   Subnormals (bf16 kernels flush them) perturb the dot products by < 2^-126 per element; an absolute
   slack of 2^-100 (1 + |x| + B)^2 covers that.

Rows with more than ``max_candidates`` candidates (a bound too loose, e.g. huge offsets or nearly
equidistant data) and rows whose threshold is not finite are answered by the plain fp32 ``knn``.
Everything that is not a float32 CPU problem, and CPUs without native bf16 dot products (where bf16 GEMMs
are emulated and slower than fp32), go to ``knn`` unchanged.
"""

from __future__ import annotations

import functools
import math
import platform

import torch

from ..core.knn import knn, squared_norms

U_BF16 = 2.0**-8
U_FP32 = 2.0**-24
_BOUND_SLACK = 1.001  # swamps the fp32/float64 rounding of the bound arithmetic itself
_ABS_SLACK = 2.0**-100  # subnormal flushing in the bf16 kernel (see step 7 of the module docstring)
SLICES = 16  # the candidate scan reduces the (Q, M) bf16 matrix to (Q, M / SLICES) group minima first


def gamma(n: int, u: float = U_FP32) -> float:
    """gamma_n = n u / (1 - n u): the error factor of an n-term floating-point sum in any order."""
    nu = n * u
    if nu >= 0.5:
        return math.inf
    return nu / (1.0 - nu)


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether the CPU has native bf16 dot-product instructions (x86 avx512_bf16 / amx_bf16, Arm bf16).

    Without them torch emulates bf16 matmuls, which are then slower than fp32, so the filter cannot win.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return False
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686", "i386"):
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    if machine in ("aarch64", "arm64"):
        return "bf16" in flags
    return False


def _split_bf16(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 values -> (hi, lo) bf16 with hi + lo = values (1 + t), |t| <= u^2."""
    hi = values.to(torch.bfloat16)
    lo = (values - hi.float()).to(torch.bfloat16)  # the difference is exact in fp32
    return hi, lo


def _bf16_upper_bits(threshold: torch.Tensor) -> torch.Tensor:
    """Non-negative float64 thresholds -> int16 bit patterns of bf16 values >= them (rounded up)."""
    tb = threshold.to(torch.bfloat16)
    bits = tb.view(torch.int16).clone()
    low = (tb.double() < threshold) & (bits < 0x7F80)  # rounded down: step to the next bf16 (never past inf)
    bits[low] += 1
    return bits


# Below this many queries the plain fp32 product is faster than shortlisting (one query, k = 9: 0.5 against
# 7.5 ms on the defaults' 4,608-row bank): the filter's fixed costs outweigh a product this small.
FEW_QUERIES = 32


class FilteredExactIndex:
    """Exact k-NN: a cheap low-precision (bf16) GEMM with a rigorous error bound shortlists candidates, then
    the shortlisted pairs are computed exactly in fp32 (the same arithmetic as search.knn for the final values
    as far as possible). Returns exactly what ExactIndex returns: same indices (except exact float ties),
    distances equal within fp32 rounding.

    ``chunk_size`` bounds the queries handled at once (as in ``knn``); the filter also works in blocks of
    about ``block_elements`` distances (4M ran ~10% faster than 2M or 1M on banks of 4,608 and 15,680 rows,
    2 threads). ``max_candidates``: queries with more shortlisted rows than this go to the plain fp32 path.
    ``use_bf16``: None detects native bf16 support (and checks the kernel's accumulation once); False always
    uses ``knn``. Fewer than ``min_queries`` queries at once also go to ``knn`` (see ``FEW_QUERIES``).
    """

    def __init__(
        self,
        bank: torch.Tensor,
        chunk_size: int | None = None,
        *,
        max_candidates: int = 256,
        block_elements: int = 1 << 22,
        use_bf16: bool | None = None,
        min_queries: int = FEW_QUERIES,
    ) -> None:
        if bank.ndim != 2:
            raise ValueError(f"the bank must be (M, D); got {tuple(bank.shape)}")
        self.bank = bank
        self.bank_sq = squared_norms(bank)
        self.chunk_size = chunk_size
        self.max_candidates = max_candidates
        self.block_elements = block_elements
        self.min_queries = max(1, min_queries)
        # running totals: queries searched, shortlisted rows of the filtered queries, fallback queries
        self.stats = {"queries": 0, "candidates": 0, "fallback_queries": 0}
        m, d = bank.shape
        if use_bf16 is None:
            use_bf16 = cpu_has_native_bf16()
        self.filtered = bool(
            use_bf16
            and m > 0
            and bank.dtype == torch.float32
            and bank.device.type == "cpu"
            and bool(torch.isfinite(bank).all())
            and gamma(d + 4) < 1e-3
        )
        if not self.filtered:
            return
        self.mean = bank.mean(dim=0)
        y = bank - self.mean
        ny = squared_norms(y)
        # upper bounds on max_j |y_j| (centered) and max_j |b_j| (raw): the computed squared norms may be
        # low by gamma_{D+2}; inflate
        inflate = 1.0 + 2.0 * gamma(d + 4)
        self.centered_max_norm = math.sqrt(float(ny.max())) * inflate
        self.raw_max_norm = math.sqrt(float(self.bank_sq.max())) * inflate
        hi, lo = _split_bf16(ny)
        ones = torch.ones(m, 1, dtype=torch.bfloat16)
        aug = torch.cat([y.to(torch.bfloat16), hi[:, None], lo[:, None], ones, ones], dim=1)
        # pad to a multiple of SLICES with rows whose d~ is +inf (zero vector, infinite squared norm)
        pad = torch.zeros((-m) % SLICES, d + 4, dtype=torch.bfloat16)
        pad[:, d] = math.inf
        self._bank_aug = torch.cat([aug, pad]).contiguous()
        if not _kernel_self_check(self, bank[: min(m, 32)]):
            self.filtered = False

    # ----------------------------------------------------------------------------------------------

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, D) queries -> (squared L2 distances (Q, k) ascending, indices (Q, k) int64)."""
        if (
            not self.filtered
            or queries.ndim != 2
            or queries.shape[1] != self.bank.shape[1]
            or queries.shape[0] < self.min_queries
            or queries.dtype != torch.float32
            or queries.device.type != "cpu"
            or not 1 <= k <= self.bank.shape[0]
        ):
            return knn(queries, self.bank, k, bank_sq=self.bank_sq, chunk_size=self.chunk_size)
        block = max(16, min(self.chunk_size or len(queries), self.block_elements // self._bank_aug.shape[0]))
        dists, indices = [], []
        for start in range(0, queries.shape[0], block):
            d, i = self._search_block(queries[start : start + block], k)
            dists.append(d)
            indices.append(i)
        return torch.cat(dists), torch.cat(indices)

    def _approx(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """bf16 approximate distances d~ (Q, M padded), the bound G (Q,) and E32 (Q,) in float64.

        Non-finite queries (or ones whose squared norm overflows) get a nan/inf G.
        """
        x = q - self.mean
        nx = squared_norms(x)
        hi, lo = _split_bf16(nx)
        ones = torch.ones(q.shape[0], 1, dtype=torch.bfloat16)
        q_aug = torch.cat([(x * -2.0).to(torch.bfloat16), ones, ones, hi[:, None], lo[:, None]], dim=1)
        approx = q_aug @ self._bank_aug.T
        g, e32 = self._bound_terms(nx, squared_norms(q))
        return approx, g, e32

    def _bound_terms(self, nx: torch.Tensor, nq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 5 and 6 of the module docstring, per query, as float64 upper bounds."""
        d = self.bank.shape[1]
        n = d + 4
        u1 = U_BF16 + U_FP32 + U_BF16 * U_FP32
        c1 = 2.0 * u1 + u1 * u1
        c2 = (1.0 + gamma(d + 2)) * (1.0 + U_BF16 * U_BF16) - 1.0
        gn = gamma(n)
        inflate = 1.0 + 2.0 * gamma(n)
        xn = nx.double().sqrt() * inflate
        big_b = self.centered_max_norm
        g = 2.0 * (c1 + gn * (1.0 + c1)) * xn * big_b + (c2 + gn * (1.0 + c2)) * (xn * xn + big_b * big_b)
        g = g * _BOUND_SLACK + _ABS_SLACK * (1.0 + xn + big_b) ** 2
        qn = nq.double().sqrt() * inflate
        e32 = gamma(d + 3) * (qn + self.raw_max_norm) ** 2 * _BOUND_SLACK
        return g, e32

    def _search_block(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        nq_rows = q.shape[0]
        approx, g, e32 = self._approx(q)
        bits = approx.view(torch.int16)
        # Slice minima: group c holds the bank rows c, c + G, c + 2 G, ... (G = padded M / SLICES); a group
        # has a row with bits <= t iff its minimum does, so one cheap strided reduction replaces a full
        # compare + nonzero pass. (Int16 order is bf16 order for d~ >= 0, and every d~ < 0 is below.)
        groups = self._bank_aug.shape[0] // SLICES
        group_min = bits.view(nq_rows, SLICES, groups).amin(dim=1)
        # Step 7: T0 from k distinct rows with small d~ (the minima of k distinct groups; any k rows give
        # a valid T0, the smallest ones a tight one)
        if k == 1:
            sel_bits = group_min.amin(dim=1, keepdim=True)
        elif k <= groups:
            sel_bits = group_min.topk(k, dim=1, largest=False, sorted=False).values
        else:  # tiny bank: k smallest of all rows (padding rows, +inf, come last)
            sel_bits = bits.topk(k, dim=1, largest=False, sorted=False).values
        sel = sel_bits.view(torch.bfloat16).double()
        r = U_BF16 / (1.0 - U_BF16)
        t0 = (sel + r * sel.abs()).amax(dim=1) + g
        t1 = ((t0 + 2.0 * e32 + g) / (1.0 - r)).clamp_min(0.0)  # raising a threshold is always safe
        finite = torch.isfinite(t1)
        t_bits = _bf16_upper_bits(torch.where(finite, t1, torch.zeros_like(t1)))
        cand_groups = (group_min <= t_bits[:, None]).nonzero()
        g_rows = cand_groups[:, 0]
        group_counts = torch.bincount(g_rows, minlength=nq_rows)
        # each candidate group holds >= 1 candidate, so too many groups already means too many candidates
        fallback = ~finite | (group_counts > self.max_candidates)
        keep = ~fallback[g_rows]
        g_rows, g_cols = g_rows[keep], cand_groups[keep, 1]
        members = g_cols[:, None] + torch.arange(SLICES) * groups  # (P_g, SLICES) bank rows
        hit = bits[g_rows[:, None], members] <= t_bits[g_rows][:, None]
        rows = g_rows[:, None].expand_as(members)[hit]
        cols = members[hit]  # sorted by row (nonzero order); padding rows never pass (d~ = +inf)
        counts = torch.bincount(rows, minlength=nq_rows)
        fallback |= (counts > self.max_candidates) | (counts < k)
        del approx, bits
        if bool(fallback.any()):
            keep = ~fallback[rows]
            rows, cols = rows[keep], cols[keep]
            counts = torch.where(fallback, torch.zeros_like(counts), counts)
        self.stats["queries"] += nq_rows
        self.stats["candidates"] += int(counts.sum())
        out_d = torch.empty(nq_rows, k, dtype=torch.float32)
        out_i = torch.empty(nq_rows, k, dtype=torch.int64)
        if bool(fallback.any()):
            fb_rows = fallback.nonzero().squeeze(1)
            self.stats["fallback_queries"] += int(fb_rows.numel())
            fb_d, fb_i = knn(q[fb_rows], self.bank, k, bank_sq=self.bank_sq, chunk_size=self.chunk_size)
            out_d[fb_rows] = fb_d
            out_i[fb_rows] = fb_i
        ok_rows = (~fallback).nonzero().squeeze(1)
        if ok_rows.numel() == 0:
            return out_d, out_i
        # fp32 rerank like knn: |b|^2 - 2 q.b ranks; |q|^2 is added to the winners, then clamped at 0
        vals = self.bank_sq[cols] - 2.0 * (q[rows] * self.bank[cols]).sum(dim=1)
        width = int(counts.max())
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(rows.numel()) - starts[rows]
        padded = torch.full((nq_rows, width), math.inf, dtype=torch.float32)
        padded_idx = torch.zeros((nq_rows, width), dtype=torch.int64)
        padded[rows, pos] = vals
        padded_idx[rows, pos] = cols
        padded, padded_idx = padded[ok_rows], padded_idx[ok_rows]
        if k == 1:
            value, where = padded.min(dim=1, keepdim=True)
        else:
            value, where = padded.topk(k, dim=1, largest=False, sorted=True)
        qk = q[ok_rows]
        out_d[ok_rows] = value.add_((qk * qk).sum(dim=1, keepdim=True)).clamp_(min=0.0)
        out_i[ok_rows] = padded_idx.gather(1, where)
        return out_d, out_i


def _kernel_self_check(index: FilteredExactIndex, probe: torch.Tensor) -> bool:
    """Check the accumulation assumption (step 4) of this machine's bf16 GEMM on the real bank.

    The bf16 approximate distances of ``probe`` rows against the whole bank must lie within the
    per-query bound of the float64 distances; a kernel that accumulated in bf16 would break it.
    """
    approx, g, _ = index._approx(probe)
    approx = approx[:, : index.bank.shape[0]]
    exact = torch.cdist(probe.double(), index.bank.double()).square()
    a = approx.double()
    err = (a - exact).abs()
    allowed = U_BF16 / (1.0 - U_BF16) * a.abs() + g[:, None]
    return bool((err <= allowed).all())
