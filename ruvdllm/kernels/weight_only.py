"""Weight-only int4 / int8 matrix products on the GPU (Triton), reading ruvdllm's layouts.

``y = x Wᵀ`` with ``x`` ``(M, K)`` in bfloat16/float16 and ``W`` stored as in
:mod:`ruvdllm.quant`: int4 as uint8 ``(N, K/2)`` (column ``2j`` in the low
nibble of byte ``j``, ``2j+1`` in the high one, signed) with 16-bit scales
``(N, K/group)``; int8 as ``(N, K)`` with one float32 scale per row. The
weight is dequantized tile by tile in registers and never written to memory,
so a product reads 0.5 (int4) or 1 (int8) byte per weight instead of 2: at
the small ``M`` of a cached denoising step the product is bound by those
bytes (the idea of Marlin, Frantar et al. 2024, here in Triton).

Why not torch's packed kernel: ``_weight_int4pack_mm`` measured slower than
bfloat16 on the H100 at these shapes (issue #6, docs/decisions.md).

int4 kernel, built for small ``M`` (docs/decisions.md has the measurements):

* **split-K** (optional): at ``M`` = 32 a 4096-wide output has only 32 tiles of
  128 columns; the K range can be cut into ``SPLIT_K`` slices whose partial
  products are added with fp32 atomics (the split-K / stream-K idea of CUTLASS;
  Osama et al. 2023);
* **128 columns per iteration**: 64 contiguous bytes of each weight row per
  load; each group's scale multiplies its 32 (or 64, 128) decoded values in
  registers, rounded as :func:`ruvdllm.quant.dequantize_int4` rounds;
* **a choice per shape** (:func:`int4_matmul`): the split, or a Triton
  dequantization followed by cuBLAS, whichever times fastest on the first call;
* **no int-to-float conversion**: a nibble ``v`` (signed) becomes ``u = v + 8``
  by flipping its top bit, and the 16-bit pattern ``MAGIC | u`` is the float
  ``BIAS + u`` (bfloat16: 0x4300 = 128, fp16: 0x6400 = 1024, both exact for
  u < 16), so ``v = float(MAGIC | u) - (BIAS + 8)``: integer bit operations and
  one subtraction (the trick of FasterTransformer's and Marlin's int4 decoders);
* the two nibbles of a byte are interleaved back into column order in registers
  (``tl.interleave``), so the activation tile is loaded as it lies.

(No ``from __future__ import annotations`` here: Triton reads the kernels'
``tl.constexpr`` annotations as objects.)
"""

import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

# int8: small M (a cached block step) is bound by weight bytes and needs many programs
# in flight: narrow N tiles; large M (a whole-sequence forward) needs wide tiles.
_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (16, 32, 256, 4, 4), (32, 32, 256, 4, 4), (32, 64, 128, 4, 4), (16, 64, 256, 4, 3),
        (64, 64, 128, 4, 4), (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 64, 128, 8, 3),
        (128, 256, 64, 8, 3),
    ]
]
# int4 (K is walked one group at a time): (BLOCK_M, BLOCK_N, warps, stages).
_INT4_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [
        (16, 64, 4, 4), (16, 128, 4, 4), (32, 64, 4, 4), (32, 128, 4, 4), (64, 64, 4, 4),
        (64, 128, 4, 4), (64, 256, 8, 3), (128, 128, 8, 3), (128, 256, 8, 3),
    ]
]
_L2_FLUSH_BYTES = 64 << 20  # more than the H100's 50 MB L2


def _quick_bench(fn: Callable[[], object], quantiles: tuple[float, ...] = (0.5,),
                 **_: Any) -> list[float]:
    """Autotuning timer: median-type quantiles (ms) of 20 calls, L2 flushed before each.

    Triton's own ``do_bench`` flushes with a 256 MB buffer and times 100 ms of
    repeats; a 64 MB flush keeps the autotuning peak (part of the W4 memory
    goal) 192 MB lower, and 20 calls suffice to rank configurations.
    """
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    fn()  # compile
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(20)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(20)]
    for start, end in zip(starts, ends, strict=True):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = torch.tensor([s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)])
    return [float(times.quantile(q)) for q in quantiles]


# Triton >= 3.2 takes the timer as ``do_bench``; older versions time with their default.
_TUNE: dict[str, Any] = (
    {"do_bench": _quick_bench} if "do_bench" in inspect.signature(triton.autotune).parameters
    else {})


def _bucket(m: int) -> int:
    """Autotuning key for M: the next power of two (a new M within it reuses the choice)."""
    return 1 << max(m - 1, 1).bit_length()


def _prune_int4(configs: list[triton.Config], named_args: dict[str, Any],
                **_: Any) -> list[triton.Config]:
    """Row tiles no taller than the (bucketed) M, at least 32 rows from M = 128 on."""
    m = named_args["M_BUCKET"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, m)
            and (m <= 64 or c.kwargs["BLOCK_M"] >= 32)]
    return kept or configs


@triton.jit
def _int4_tile(w_ptr, s_ptr, rn, n_ok, it, stride_wn, stride_sn,  # type: ignore[no-untyped-def]
               DTYPE: tl.constexpr, GROUP: tl.constexpr, GPI: tl.constexpr,
               MAGIC: tl.constexpr, BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Weight tile ``(BLOCK_N, GROUP * GPI)`` of iteration ``it``, dequantized to DTYPE."""
    BK: tl.constexpr = GROUP * GPI
    rj = tl.arange(0, BK // 2)  # byte columns of the tile
    p = tl.load(w_ptr + rn[:, None] * stride_wn + (it * (BK // 2) + rj)[None, :],
                mask=n_ok[:, None], other=0)  # (BN, BK/2) uint8, two nibbles each
    u = p.to(tl.uint16) ^ 0x88  # each nibble v -> v + 8 in 0..15
    low = ((u & 0xF) | MAGIC).to(tl.uint16).to(DTYPE, bitcast=True)  # BIAS + v + 8, exact
    high = ((u >> 4) | MAGIC).to(tl.uint16).to(DTYPE, bitcast=True)
    q = (tl.interleave(low, high) - (BIAS + 8)).to(DTYPE)  # (BN, BK) the integers v
    s = tl.load(s_ptr + rn[:, None] * stride_sn + (it * GPI + tl.arange(0, GPI))[None, :],
                mask=n_ok[:, None], other=0.0).to(DTYPE)  # (BN, GPI)
    w = tl.reshape(q, (BLOCK_N, GPI, GROUP)) * s[:, :, None]  # rounded as dequantize_int4
    return tl.reshape(w.to(DTYPE), (BLOCK_N, BK))


@triton.autotune(configs=_INT4_CONFIGS, key=["M_BUCKET", "N", "K", "SPLIT_K"],
                 prune_configs_by={"early_config_prune": _prune_int4},
                 reset_to_zero=["y_ptr"], **_TUNE)
@triton.jit
def _int4_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, M_BUCKET,  # type: ignore[no-untyped-def]
                 stride_xm, stride_wn, stride_sn, stride_ym,
                 GROUP: tl.constexpr, GPI: tl.constexpr, SPLIT_K: tl.constexpr,
                 MAGIC: tl.constexpr, BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    BK: tl.constexpr = GROUP * GPI
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < N
    iters = K // BK
    per_split = tl.cdiv(iters, SPLIT_K)
    it_lo = pid_k * per_split
    it_hi = tl.minimum(it_lo + per_split, iters)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(it_lo, it_hi):
        x = tl.load(x_ptr + rm[:, None] * stride_xm + (it * BK + rk)[None, :],
                    mask=m_ok[:, None], other=0.0)  # (BM, BK)
        w = _int4_tile(w_ptr, s_ptr, rn, n_ok, it, stride_wn, stride_sn, x.dtype, GROUP, GPI,
                       MAGIC, BIAS, BLOCK_N)
        acc = tl.dot(x, tl.trans(w), acc)
    y = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    if SPLIT_K == 1:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    else:
        tl.atomic_add(y, acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _int4_dequant_kernel(w_ptr, s_ptr, y_ptr, N, K,  # type: ignore[no-untyped-def]
                         stride_wn, stride_sn, GROUP: tl.constexpr, GPI: tl.constexpr,
                         MAGIC: tl.constexpr, BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """The whole weight ``(N, K)`` dequantized (for large M: then one cuBLAS product)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    it = tl.program_id(1)
    BK: tl.constexpr = GROUP * GPI
    n_ok = rn < N
    w = _int4_tile(w_ptr, s_ptr, rn, n_ok, it, stride_wn, stride_sn, y_ptr.dtype.element_ty,
                   GROUP, GPI, MAGIC, BIAS, BLOCK_N)
    tl.store(y_ptr + rn[:, None] * K + (it * BK + tl.arange(0, BK))[None, :], w,
             mask=n_ok[:, None])


@triton.autotune(configs=_CONFIGS, key=["M_BUCKET", "N", "K"], **_TUNE)
@triton.jit
def _int8_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, M_BUCKET,  # type: ignore[no-untyped-def]
                 stride_xm, stride_wn, stride_ym,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :],
                    mask=(rm[:, None] < M) & (k[None, :] < K), other=0.0)
        q = tl.load(w_ptr + rn[None, :] * stride_wn + k[:, None],
                    mask=(k[:, None] < K) & (rn[None, :] < N), other=0)  # (BK, BN)
        acc = tl.dot(x, q.to(x.dtype), acc)  # |q| <= 127 is exact in bf16/fp16
    s = tl.load(s_ptr + rn, mask=rn < N, other=0.0)  # the row scale commutes with the sum
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :],
             (acc * s[None, :]).to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def _grid(M: int, N: int):  # type: ignore[no-untyped-def]
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))


# bfloat16 / float16 bit pattern whose low 4 mantissa bits hold an integer u: BIAS + u.
_MAGIC = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0)}


def _groups_per_iter(K: int, group: int) -> int:
    """Groups per loop iteration: 128 columns (64 contiguous bytes of a row) where K allows."""
    gpi = max(128 // group, 1)
    while gpi > 1 and K % (group * gpi):
        gpi //= 2
    return gpi


def _int4_fused(x: Tensor, packed: Tensor, scales: Tensor, split: int) -> Tensor:
    """The fused kernel with ``split`` K slices (float32 atomics when more than one)."""
    M, K = x.shape
    N = packed.shape[0]
    group = K // scales.shape[1]
    y = (torch.zeros(M, N, dtype=torch.float32, device=x.device) if split > 1
         else torch.empty(M, N, dtype=x.dtype, device=x.device))
    magic, bias = _MAGIC[x.dtype]

    def grid(meta: dict[str, Any]) -> tuple[int, int, int]:
        return (triton.cdiv(N, meta["BLOCK_N"]), split, triton.cdiv(M, meta["BLOCK_M"]))

    _int4_kernel[grid](x, packed, scales, y, M, N, K, _bucket(M),
                       x.stride(0), packed.stride(0), scales.stride(0), y.stride(0),
                       GROUP=group, GPI=_groups_per_iter(K, group), SPLIT_K=split,
                       MAGIC=magic, BIAS=bias)
    return y.to(x.dtype)


def int4_dequantize(packed: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """The int4 weight as ``(N, K)`` of ``dtype`` (16-bit), decoded as the fused kernel does."""
    N, K = packed.shape[0], packed.shape[1] * 2
    group = K // scales.shape[1]
    gpi = _groups_per_iter(K, group)
    y = torch.empty(N, K, dtype=dtype, device=packed.device)
    magic, bias = _MAGIC[dtype]
    _int4_dequant_kernel[(triton.cdiv(N, 64), K // (group * gpi))](
        packed, scales, y, N, K, packed.stride(0), scales.stride(0), GROUP=group, GPI=gpi,
        MAGIC=magic, BIAS=bias, BLOCK_N=64)
    return y


def _int4_candidates(x: Tensor, packed: Tensor,
                     scales: Tensor) -> dict[str, Callable[[], Tensor]]:
    """Ways to compute one product: the fused kernel per split, dequantize + cuBLAS."""
    K = x.shape[1]
    iters = K // (K // scales.shape[1] * _groups_per_iter(K, K // scales.shape[1]))
    out: dict[str, Callable[[], Tensor]] = {
        f"fused/{s}": partial(_int4_fused, x, packed, scales, s)
        for s in (1, 2, 4, 8) if s == 1 or iters // s >= 2}
    # A transient 16-bit copy of the weight; below 128 rows it measured slower inside the
    # step graphs than the fused kernel, although it can time faster alone (decisions.md).
    if x.shape[0] >= 128 and packed.numel() * 4 <= _DEQUANT_MAX_BYTES:
        out["dequant"] = lambda: F.linear(x, int4_dequantize(packed, scales, x.dtype))
    return out


# Largest transient 16-bit weight of the dequantize candidate: every linear of the 8B
# shape but the LM head (1 GB), whose fused kernel wins at a step's M anyway.
_DEQUANT_MAX_BYTES = 128 << 20
_CHOICE: dict[tuple[int, int, int, torch.dtype], str] = {}


def int4_matmul(x: Tensor, packed: Tensor, scales: Tensor) -> Tensor:
    """``x`` ``(M, K)`` times the int4 weight ``(N, K/2)`` transposed: ``(M, N)`` in x's dtype.

    The first call of a shape (M to the next power of two, N, K) times every
    candidate of :func:`_int4_candidates` and keeps the fastest: which split of K,
    or whether dequantizing for cuBLAS wins, depends on the shape and the GPU
    (docs/decisions.md). A shape first met while a CUDA graph is being captured
    takes the fused kernel unsplit (timing is impossible there; the fast path's
    warm-up run meets every shape first).
    """
    if x.dtype not in _MAGIC:
        raise ValueError(f"int4_matmul takes bfloat16 or float16 activations, got {x.dtype}")
    x = x.contiguous()
    key = (_bucket(x.shape[0]), packed.shape[0], x.shape[1], x.dtype)
    candidates = _int4_candidates(x, packed, scales)
    if key not in _CHOICE:
        if torch.cuda.is_current_stream_capturing():
            return _int4_fused(x, packed, scales, 1)
        times = {name: _quick_bench(fn)[0] for name, fn in candidates.items()}
        _CHOICE[key] = min(times, key=lambda name: times[name])
    return candidates[_CHOICE[key]]()


def int8_matmul(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """``x`` ``(M, K)`` times the int8 weight ``(N, K)`` transposed, row scales applied."""
    M, K = x.shape
    N = weight.shape[0]
    x = x.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    _int8_kernel[_grid(M, N)](x, weight, scales, y, M, N, K, _bucket(M),
                              x.stride(0), weight.stride(0), y.stride(0))
    return y
