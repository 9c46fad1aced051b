"""W4A8 products on the GPU (Triton): int4 weights times int8 activations on integer
tensor cores.

``y = x Wᵀ`` with ``W`` int4 (two signed nibbles per byte, uint8 ``(N, K/2)``; one
scale per row and group of ``GROUP`` columns) and ``x`` quantized per row to int8
just before the product (:func:`ruvdllm.kernels.rowquant.quantize_rows`, or the
kernel that wrote ``x``).
Why not the weight-only kernel of
:mod:`ruvdllm.kernels.weight_only`: there each int4 weight becomes a 16-bit float
times its scale before a bfloat16 ``tl.dot`` (about 2.25 instructions per weight),
and the bfloat16 ``x`` tile, re-read by every column tile, is four times the int4
tile's bytes at 64 rows; both kept it at 22-53 % of the memory bandwidth
(docs/decisions.md, round 4). Here:

* a byte's nibbles become int8 ``16 q`` with two bit operations per 4 bytes
  (``byte << 4`` and ``byte & 0xF0``: the signed nibble lands in the high half,
  exactly ``16 q``; the 16 is folded into the output scale), no float
  conversion, and no shuffle into the operand's register layout;
* each group's product is exact in int32 (``|16 q x| ≤ 128 · 127`` per term) and
  is scaled once per output element and group, not once per weight;
* the ``x`` tile is int8 (half of bfloat16's bytes) and the integer tensor cores
  run at twice bfloat16's rate.

The activation quantization is per row (one token), symmetric, ``max |x| -> 127``
(the per-token scheme of LLM.int8 and SmoothQuant's baseline; W4A8 as in QServe,
Lin et al. 2024, without its progressive group quantization). The weight layout
is :class:`ruvdllm.quant.W4A8Linear`'s: columns reordered in chunks of 32 so
that the decoded registers are the tensor-core operand's as they come, and group
scales transposed, ``(K/GROUP, N)``, so a tile's scales of one group are one
contiguous load.

(No ``from __future__ import annotations`` here: Triton reads the kernels'
``tl.constexpr`` annotations as objects.)
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ruvdllm.kernels.pdl import pdl_args, wait_inputs
from ruvdllm.kernels.weight_only import split_k_output, store_tile


@triton.jit
def decode_int4(p, BLOCK_N: tl.constexpr, GROUP: tl.constexpr):  # type: ignore[no-untyped-def]
    """One group's packed bytes ``p`` ``(BN, G/2)`` as int8 ``16 q`` ``(BN, G)`` in column
    order: per 4 bytes, two bit operations each for the low and the high nibbles."""
    low, high = tl.inline_asm_elementwise(
        "{.reg .b32 t; shl.b32 t, $2, 4; and.b32 $0, t, 0xF0F0F0F0; "
        "and.b32 $1, $2, 0xF0F0F0F0;}",
        "=r,=r,r", [p], dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
    # byte j of a 16-byte chunk c holds columns 32 c + j (low) and 32 c + 16 + j (high):
    # a relabelling of registers, no data moves (checked in the SASS)
    w = tl.reshape(tl.join(low, high), (BLOCK_N, GROUP // 32, 16, 2))  # (BN, G/32, 16, 2)
    return tl.reshape(tl.permute(w, (0, 1, 3, 2)), (BLOCK_N, GROUP))  # (BN, G) in order


@triton.jit
def _w4a8_group(acc, x_ptr, w_ptr, s, rn, rm, n_ok, m_ok, g,  # type: ignore[no-untyped-def]
                stride_xm, stride_wn, GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    """``acc`` plus group ``g``'s product, scaled by its weight scales ``s`` ``(BN,)``."""
    rj = tl.arange(0, GROUP // 2)
    rk = tl.arange(0, GROUP)
    p = tl.load(w_ptr + rn[:, None] * stride_wn + (g * (GROUP // 2) + rj)[None, :],
                mask=n_ok[:, None], other=0)  # (BN, G/2) packed bytes
    w = decode_int4(p, BLOCK_N, GROUP)  # (BN, G)
    xt = tl.load(x_ptr + rm[None, :] * stride_xm + (g * GROUP + rk)[:, None],
                 mask=m_ok[None, :], other=0)  # (G, BM) int8
    return acc + tl.dot(w, xt, out_dtype=tl.int32).to(tl.float32) * s[:, None]


@triton.jit
def _w4a8_pair(acc, x_ptr, w_ptr, s, rn, rm, n_ok, m_ok, g,  # type: ignore[no-untyped-def]
               stride_xm, stride_wn, GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    """``acc`` plus groups ``g`` and ``g + 1``, their scales the columns of ``s`` ``(BN, 2)``."""
    s0, s1 = tl.split(s)  # (BN,) each
    acc = _w4a8_group(acc, x_ptr, w_ptr, s0, rn, rm, n_ok, m_ok, g, stride_xm, stride_wn,
                      GROUP, BLOCK_N)
    return _w4a8_group(acc, x_ptr, w_ptr, s1, rn, rm, n_ok, m_ok, g + 1, stride_xm,
                       stride_wn, GROUP, BLOCK_N)


@triton.jit
def w4a8_tile(x_ptr, xs_ptr, w_ptr, s_ptr, y_ptr, M, N, K,  # type: ignore[no-untyped-def]
              pid_n, pid_k, pid_m, split, stride_xm, stride_wn, stride_sg, stride_ym,
              stride_ys, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              UNROLL: tl.constexpr, ADD: tl.constexpr, PDL: tl.constexpr):
    """``yᵀ`` tile ``(BLOCK_N, BLOCK_M)`` number ``(pid_n, pid_m)`` = weight tile times
    ``xᵀ``, over slice ``pid_k`` of K split ``split`` ways, UNROLL (1, 2 or 4) groups
    per iteration. With ``ADD`` the slices are added with atomics, else slice ``k`` is
    stored at ``y_ptr + k * stride_ys``.

    The first scales are loaded before the wait on the input
    (:func:`ruvdllm.kernels.pdl.wait_inputs`): no kernel writes them. The scales of
    the next iteration's groups are loaded at the start of this one: Triton's pipeline
    copies ahead only what feeds ``tl.dot``, and a scale loaded where it is used
    stalled each iteration on a memory round trip.
    """
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ru = tl.arange(0, UNROLL)
    n_ok = rn < N
    m_ok = rm < M
    per_split = K // GROUP // split  # the host makes split * UNROLL divide the groups
    first = pid_k * per_split
    last = first + per_split - UNROLL
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    s_next = tl.load(s_ptr + (first + ru)[:, None] * stride_sg + rn[None, :],
                     mask=n_ok[None, :], other=0.0)  # (U, BN)
    wait_inputs(PDL)
    for g in range(first, last + UNROLL, UNROLL):
        s = s_next.to(tl.float32)
        s_next = tl.load(s_ptr + (tl.minimum(g + UNROLL, last) + ru)[:, None] * stride_sg
                         + rn[None, :], mask=n_ok[None, :], other=0.0)
        if UNROLL == 1:
            acc = _w4a8_group(acc, x_ptr, w_ptr, tl.reshape(s, (BLOCK_N,)), rn, rm, n_ok,
                              m_ok, g, stride_xm, stride_wn, GROUP, BLOCK_N)
        elif UNROLL == 2:
            acc = _w4a8_pair(acc, x_ptr, w_ptr, tl.permute(s, (1, 0)), rn, rm, n_ok, m_ok, g,
                             stride_xm, stride_wn, GROUP, BLOCK_N)
        else:  # 4: (BN, 4) as (BN, b, a) with group 2 a + b, split into a = 0 and a = 1
            lo, hi = tl.split(tl.permute(tl.reshape(tl.permute(s, (1, 0)), (BLOCK_N, 2, 2)),
                                         (0, 2, 1)))  # (BN, 2) each
            acc = _w4a8_pair(acc, x_ptr, w_ptr, lo, rn, rm, n_ok, m_ok, g, stride_xm,
                             stride_wn, GROUP, BLOCK_N)
            acc = _w4a8_pair(acc, x_ptr, w_ptr, hi, rn, rm, n_ok, m_ok, g + 2, stride_xm,
                             stride_wn, GROUP, BLOCK_N)
    xs = tl.load(xs_ptr + rm, mask=m_ok, other=0.0) * (1.0 / 16)  # the 16 of 16 q
    store_tile(y_ptr + pid_k * stride_ys, acc * xs[None, :], rn, rm, n_ok, m_ok, stride_ym,
               ADD)


@triton.jit
def _w4a8_kernel(x_ptr, xs_ptr, w_ptr, s_ptr, y_ptr, M, N, K,  # type: ignore[no-untyped-def]
                 stride_xm, stride_wn, stride_sg, stride_ym, stride_ys, GROUP: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
                 UNROLL: tl.constexpr, PARTIALS: tl.constexpr, PDL: tl.constexpr):
    """One :func:`w4a8_tile` a program: grid (column tiles, K slices, row tiles). A split
    K's slices are added with atomics, or with ``PARTIALS`` stored apart."""
    w4a8_tile(x_ptr, xs_ptr, w_ptr, s_ptr, y_ptr, M, N, K, tl.program_id(0),
              tl.program_id(1), tl.program_id(2), SPLIT_K, stride_xm, stride_wn, stride_sg,
              stride_ym, stride_ys, GROUP, BLOCK_M, BLOCK_N, UNROLL,
              SPLIT_K > 1 and not PARTIALS, PDL)


class W4A8Config(NamedTuple):
    """Tiles of the W4A8 kernel: rows (x), columns (weight); launch shape; groups per
    iteration."""

    block_m: int
    block_n: int
    warps: int
    stages: int
    split_k: int
    unroll: int = 1


def w4a8_config(m: int, N: int, K: int) -> W4A8Config:
    """The kernel's configuration for ``m`` rows of an ``(N, K)`` weight.

    From ``python3 -m bench.gpu_probe w4a8-tiles`` on the H200 (every 8B product
    at 32, 64, 384, 512 and 3 072 rows; docs/decisions.md, sessions 6 and 8): two
    groups per iteration and 3 stages, except at <= 32 rows for 16K-64K weight rows
    (4 stages: gate/up, 18.4 against 21.3 µs) and up to 16K unsplit (four groups:
    q/k/v, 11.9 against 12.9 µs); up to 64 rows one tile of rows and 64 weight rows
    per program (the tensor core's M), split-K only where N alone gives 64 column
    tiles (4, or 8 for K >= 8 192 at <= 32 rows); up to 384 rows 64 x 64 tiles;
    above, 128 x 64 (the LM head 128 x 128 over 8 warps).
    """
    if m <= 64:
        split = 1 if N > 64 * 64 else 8 if K >= 8192 and m <= 32 else 4
        few = m <= 32 and split == 1
        stages = 4 if few and 16384 < N < 65536 else 3
        unroll = 4 if few and N <= 16384 else 2
        return W4A8Config(max(16, triton.next_power_of_2(m)), 64, 4, stages, split, unroll)
    if m <= 384 and N < 65536:
        return W4A8Config(64, 64, 4, 3, 1, 2)
    return W4A8Config(128, 128, 8, 3, 1, 2) if N >= 65536 and m > 384 else \
        W4A8Config(128, 64, 4, 3, 1, 2)


def w4a8_matmul(q: Tensor, x_scale: Tensor, packed: Tensor, scales: Tensor,
                dtype: torch.dtype, cfg: W4A8Config | None = None,
                partials: bool = False) -> Tensor:
    """``(q * x_scale) Wᵀ`` as ``(M, N)`` of ``dtype``; with ``partials``, as the terms
    ``(S, M, N)`` whose sum it is: float32 sums over each of the S slices of a split K
    (``S = 1``: the product, of ``dtype``).

    ``q`` int8 ``(M, K)`` with row scales ``x_scale`` float32 ``(M,)``
    (:func:`ruvdllm.kernels.rowquant.quantize_rows`); ``W`` in
    :class:`ruvdllm.quant.W4A8Linear`'s layout:
    ``packed`` uint8 ``(N, K/2)``, ``scales`` ``(K/GROUP, N)`` with unit column stride.
    Partials are for a reader that adds the product to something anyway (the residual
    sum of :func:`ruvdllm.kernels.elementwise.add_rms_norm_rows`): a split K then needs
    no zeroed output, no atomics and no conversion kernel, and the sum is in a fixed order.
    """
    M, K = q.shape
    N = packed.shape[0]
    group = K // scales.shape[0]
    if (group * scales.shape[0] != K or group % 32 or packed.shape[1] * 2 != K
            or scales.shape[1] != N or scales.stride(1) != 1):
        raise ValueError(f"w4a8_matmul: weight {tuple(packed.shape)} and scales "
                         f"{tuple(scales.shape)} do not fit K={K} in groups of 32 or more")
    q = q.contiguous()
    bm, bn, warps, stages, split, unroll = cfg or w4a8_config(M, N, K)
    while (K // group) % (split * unroll):
        split, unroll = (split // 2, unroll) if split > 1 else (1, unroll // 2)
    y = split_k_output(M, N, split, dtype, q.device, partials)  # (M, N) or (S, M, N)
    grid = (triton.cdiv(N, bn), split, triton.cdiv(M, bm))
    _w4a8_kernel[grid](q, x_scale, packed, scales, y, M, N, K, q.stride(0), packed.stride(0),
                       scales.stride(0), y.stride(-2), M * N if partials else 0, GROUP=group,
                       BLOCK_M=bm, BLOCK_N=bn, SPLIT_K=split, UNROLL=unroll,
                       PARTIALS=partials, num_warps=warps, num_stages=stages,
                       **pdl_args(q.device))
    return y if partials else y.to(dtype)
