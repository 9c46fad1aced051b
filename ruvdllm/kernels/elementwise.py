"""Fused element-wise kernels of a transformer block (Triton): RMSNorm, RoPE, SwiGLU.

Why: in eager PyTorch each of these is several kernels (RMSNorm: upcast, square,
mean, rsqrt, two products, downcast; RoPE: upcast, chunk, negate, concatenate,
two products, a sum, downcast; SwiGLU: SiLU and a product), about 30 per layer.
At a cached denoising step every kernel moves little data, so inside a CUDA graph
each still costs a launch slot of a few microseconds: ~1 000 per step of the 8B
shape, against a weight-read floor of 1.4 ms (int4). One kernel per operation
reads its inputs once and writes once. Each computes in float32 and rounds where
the eager code rounds, so results match it up to float32 contraction.

Neighbouring operations share a kernel where the fast path runs them back to
back: a residual sum and the RMSNorm after it (:func:`add_rms_norm`), RoPE and
the key/value slot writes of a cached step (:func:`rope_qkv_into`); RMSNorm and
SwiGLU can also return their outputs' maxima, the input scale of a float8
product with one scale (:mod:`ruvdllm.kernels.fp8`), or their outputs quantized per row
(:mod:`ruvdllm.kernels.rowquant`: int8 for a W4A8 product, float8 for a row-scaled W8A8
one), from registers. The residual sum also takes a split-K product's terms and adds
them itself. Each kernel waits for its inputs with
:func:`ruvdllm.kernels.pdl.wait_inputs`: on Hopper it is launched while the previous
kernel is still running.

(No ``from __future__ import annotations`` here: Triton reads the kernels'
``tl.constexpr`` annotations as objects.)
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ruvdllm.kernels.pdl import pdl_args, wait_inputs
from ruvdllm.kernels.rowquant import quantize_row, row_format


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, r_stride, sum_ptr, w_ptr, y_ptr,  # type: ignore[no-untyped-def]
                     amax_ptr, D, eps, BLOCK: tl.constexpr, ADD: tl.constexpr,
                     PARTS: tl.constexpr, AMAX: tl.constexpr, ROWS: tl.constexpr,
                     FP8: tl.constexpr, PDL: tl.constexpr):
    wait_inputs(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=ok, other=0.0)
    if ADD:  # the residual sum first, rounded where the eager ``x + r`` rounds it
        r = tl.zeros((BLOCK,), dtype=tl.float32)
        for part in tl.static_range(PARTS):  # a split-K product's slices, in order
            r += tl.load(r_ptr + part * r_stride + row * D + cols, mask=ok,
                         other=0.0).to(tl.float32)
        x = (x.to(tl.float32) + r).to(x.dtype)
        tl.store(sum_ptr + row * D + cols, x, mask=ok)
    x = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    normed = (x * inv).to(w.dtype)  # the eager path rounds here, then scales
    y = (normed.to(tl.float32) * w.to(tl.float32)).to(w.dtype)
    if ROWS:  # the output quantized per row (int8, or float8 with FP8), its scale in amax_ptr
        quantize_row(y, y_ptr + row * D, amax_ptr + row, cols, ok, FP8)
    else:
        tl.store(y_ptr + row * D + cols, y, mask=ok)
        if AMAX:  # the row's largest magnitude, for a float8 product's input scale
            tl.store(amax_ptr + row, tl.max(tl.abs(y.to(tl.float32)), axis=0))


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``RMSNorm`` (Zhang & Sennrich 2019) over the last dimension; ``x`` and ``weight`` 16-bit."""
    return add_rms_norm(x, None, weight, eps, amax=False)[1]


# Warps of a norm program that also sums a split-K product's terms: its row then reads
# S x D float32 (the 8B MLP's down product: 8 x 16 KB), and with Triton's default 4 warps
# the norm kernels took twice as long (docs/decisions.md, session 7).
PARTS_WARPS = 16


def _norm_launch(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float, amax: bool,
                 quantized: bool, fp8: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(s (x's shape), y (rows, D), side (rows,) or (1,))``: one run of the norm kernel."""
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()  # (rows, D)
    rows = x2.shape[0]
    y = torch.empty(rows, D, dtype=row_format(fp8) if quantized else x2.dtype, device=x.device)
    total = x2 if residual is None else torch.empty_like(x2)
    parts = 1 if residual is None or residual.dim() == x.dim() else residual.shape[0]
    r = x2 if residual is None else residual.reshape(parts, rows, D).contiguous()  # (S, rows, D)
    side = torch.empty(rows if amax or quantized else 1, dtype=torch.float32, device=x.device)
    _rms_norm_kernel[(rows,)](x2, r, rows * D, total, weight, y, side, D, eps,
                              BLOCK=triton.next_power_of_2(D), ADD=residual is not None,
                              PARTS=parts, AMAX=amax, ROWS=quantized, FP8=fp8,
                              num_warps=PARTS_WARPS if parts > 1 else 4, **pdl_args(x.device))
    return total.view(x.shape), y, side


def add_rms_norm(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float,
                 amax: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(s, rms_norm(s), maxima)`` with ``s = x + residual`` (``x`` without one).

    ``residual`` is of ``x``'s shape, or ``(S, *x.shape)``: the terms of a split-K
    product (:func:`ruvdllm.kernels.w4a8.w4a8_matmul` with ``partials``), added here in
    float32 in order, then to ``x``.

    One kernel for a block's residual sum and the norm after it (each is
    otherwise a launch and a pass over the rows). With ``amax`` it also returns
    each output row's largest magnitude (float32 ``(rows,)``): a float8 product
    of the output needs ``max |y|`` for its input scale, and taken here from
    registers it spares the product a reduction kernel.
    """
    total, y, maxima = _norm_launch(x, residual, weight, eps, amax, quantized=False, fp8=False)
    return total, y.view(x.shape), maxima


def add_rms_norm_rows(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float,
                      fp8: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``(s, q, scale)``: :func:`add_rms_norm`'s sum, and its norm quantized per row
    (int8 for a W4A8 product, or float8 with ``fp8``: ``(rows, D)``, scales float32
    ``(rows,)``, those of :func:`ruvdllm.kernels.rowquant.quantize_rows`), from
    registers: the 16-bit output is never written, and no quantization kernel runs."""
    return _norm_launch(x, residual, weight, eps, amax=False, quantized=True, fp8=fp8)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, H, T,  # type: ignore[no-untyped-def]
                 sxb, sxh, sxt, scb, sct, HALF: tl.constexpr, PDL: tl.constexpr):
    wait_inputs(PDL)
    bt = tl.program_id(0)  # one (row, position) per program, every head
    h = tl.program_id(1)
    b = bt // T
    t = bt % T
    i = tl.arange(0, HALF)
    src = x_ptr + b * sxb + h * sxh + t * sxt
    x1 = tl.load(src + i).to(tl.float32)
    x2 = tl.load(src + HALF + i).to(tl.float32)
    c = tl.load(cos_ptr + b * scb + t * sct + i)  # the table repeats its halves
    s = tl.load(sin_ptr + b * scb + t * sct + i)
    dst = y_ptr + ((b * H + h) * T + t) * (2 * HALF)
    tl.store(dst + i, (x1 * c - x2 * s).to(y_ptr.dtype.element_ty))
    tl.store(dst + HALF + i, (x2 * c + x1 * s).to(y_ptr.dtype.element_ty))


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE (Su et al. 2021) of ``x`` ``(B, H, T, hd)`` (any strides), halves layout.

    ``cos``/``sin`` are float32 ``(B, 1, T, hd)`` tables (contiguous); the result
    is a contiguous ``(B, H, T, hd)`` tensor of x's dtype.
    """
    B, H, T, hd = x.shape
    if x.stride(3) != 1 or not cos.is_contiguous() or not sin.is_contiguous():
        raise ValueError("rope needs unit-stride head dims and contiguous tables")
    y = torch.empty(B, H, T, hd, dtype=x.dtype, device=x.device)
    _rope_kernel[(B * T, H)](x, cos, sin, y, H, T, x.stride(0), x.stride(1), x.stride(2),
                             cos.stride(0), cos.stride(2), HALF=hd // 2,
                             **pdl_args(x.device))
    return y


@triton.jit
def _rope_qkv_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,  # type: ignore[no-untyped-def]
                     idx_ptr, T, L, H, HKV, s_row, scb, sct,
                     HALF: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr):
    wait_inputs(PDL)
    bt = tl.program_id(0)  # one (row, position) per program
    part = tl.program_id(1)  # 0: queries, 1: keys, 2: values
    b = bt // T
    t = bt % T
    h = tl.arange(0, BLOCK_H)[:, None]  # (BLOCK_H, 1) heads
    i = tl.arange(0, HALF)[None, :]  # (1, HALF)
    hd = 2 * HALF
    slot = tl.load(idx_ptr + t)
    src = qkv_ptr + bt * s_row + tl.where(part == 0, 0, H * hd + (part - 1) * HKV * hd)
    heads = tl.where(part == 0, H, HKV)
    ok = (h < heads) & (i < HALF)
    x1 = tl.load(src + h * hd + i, mask=ok, other=0.0)
    x2 = tl.load(src + h * hd + HALF + i, mask=ok, other=0.0)
    if part == 2:  # values: copied into their slots as they are
        dst = v_ptr + ((b * HKV + h) * L + slot) * hd
        tl.store(dst + i, x1, mask=ok)
        tl.store(dst + HALF + i, x2, mask=ok)
    else:
        c = tl.load(cos_ptr + b * scb + t * sct + i)  # the table repeats its halves
        s = tl.load(sin_ptr + b * scb + t * sct + i)
        y1 = (x1.to(tl.float32) * c - x2.to(tl.float32) * s).to(x1.dtype)
        y2 = (x2.to(tl.float32) * c + x1.to(tl.float32) * s).to(x1.dtype)
        if part == 0:  # queries: (B, T, H, hd) memory
            dst = q_ptr + ((b * T + t) * H + h) * hd
        else:  # keys: their slots of the (B, Hkv, L, hd) buffer
            dst = k_ptr + ((b * HKV + h) * L + slot) * hd
        tl.store(dst + i, y1, mask=ok)
        tl.store(dst + HALF + i, y2, mask=ok)


def rope_qkv_into(qkv: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor,
                  index: Tensor, n_heads: int) -> Tensor:
    """Queries of a fused q/k/v product, RoPE applied; keys (RoPE'd) and values written
    into their slots ``index`` of ``keys``/``values``.

    One kernel for what is otherwise two RoPE kernels and two ``index_copy_``
    (each a launch at every layer of every step). ``qkv`` ``(B, T, (H + 2 Hkv) hd)``
    with unit-stride rows; ``cos``/``sin`` float32 ``(B, 1, T, hd)``, contiguous;
    ``keys``/``values`` contiguous ``(B, Hkv, L, hd)``; ``index`` ``(T,)``.
    Returns queries ``(B, H, T, hd)``, a view of ``(B, T, H, hd)`` memory: attention
    then writes its output in that layout too, and ``(B, T, d)`` is a view of it.
    """
    B, T, width = qkv.shape
    _, Hkv, L, hd = keys.shape
    if (qkv.stride(2) != 1 or width != (n_heads + 2 * Hkv) * hd or not cos.is_contiguous()
            or not sin.is_contiguous() or not keys.is_contiguous()
            or not values.is_contiguous()):
        raise ValueError("rope_qkv_into: unexpected layout of q/k/v, tables or buffers")
    q = torch.empty(B, T, n_heads, hd, dtype=qkv.dtype, device=qkv.device)
    rows = qkv.reshape(B * T, width)  # (B T, width): a view for unit-stride rows
    _rope_qkv_kernel[(B * T, 3)](rows, cos, sin, q, keys, values, index, T, L, n_heads, Hkv,
                                 rows.stride(0), cos.stride(0), cos.stride(2), HALF=hd // 2,
                                 BLOCK_H=triton.next_power_of_2(max(n_heads, Hkv)),
                                 **pdl_args(qkv.device))
    return q.transpose(1, 2)  # (B, H, T, hd)


@triton.jit
def _swiglu_kernel(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr,  # type: ignore[no-untyped-def]
                   PDL: tl.constexpr):
    wait_inputs(PDL)
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    g = tl.load(g_ptr + i, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + i, mask=ok, other=0.0)
    act = (g * tl.sigmoid(g)).to(u.dtype)  # SiLU, rounded as the eager path rounds it
    tl.store(y_ptr + i, (act.to(tl.float32) * u.to(tl.float32)).to(u.dtype), mask=ok)


@triton.jit
def _swiglu_halves_kernel(gu_ptr, y_ptr, amax_ptr, F,  # type: ignore[no-untyped-def]
                          BLOCK: tl.constexpr, AMAX: tl.constexpr, PDL: tl.constexpr):
    wait_inputs(PDL)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    i = chunk * BLOCK + tl.arange(0, BLOCK)
    ok = i < F
    g = tl.load(gu_ptr + row * 2 * F + i, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * F + F + i, mask=ok, other=0.0)
    act = (g * tl.sigmoid(g)).to(u.dtype)
    y = (act.to(tl.float32) * u.to(tl.float32)).to(u.dtype)
    tl.store(y_ptr + row * F + i, y, mask=ok)
    if AMAX:  # this chunk's largest magnitude: (rows, chunks) maxima, no atomics
        tl.store(amax_ptr + row * tl.num_programs(1) + chunk,
                 tl.max(tl.abs(y.to(tl.float32)), axis=0))


def _swiglu_halves(gate_up: Tensor, amax: bool) -> tuple[Tensor, Tensor]:
    F2 = gate_up.shape[-1]
    gu = gate_up.reshape(-1, F2).contiguous()  # (rows, 2F)
    rows, chunks = gu.shape[0], triton.cdiv(F2 // 2, 1024)
    y = torch.empty(rows, F2 // 2, dtype=gu.dtype, device=gu.device)
    maxima = torch.empty(rows * chunks if amax else 1, dtype=torch.float32, device=gu.device)
    _swiglu_halves_kernel[(rows, chunks)](gu, y, maxima, F2 // 2, BLOCK=1024, AMAX=amax,
                                          **pdl_args(gu.device))
    return y.view(*gate_up.shape[:-1], F2 // 2), maxima


@triton.jit
def _swiglu_rows_kernel(gu_ptr, q_ptr, s_ptr, F,  # type: ignore[no-untyped-def]
                        BLOCK: tl.constexpr, FP8: tl.constexpr, PDL: tl.constexpr):
    wait_inputs(PDL)
    row = tl.program_id(0)  # a whole row per program: its scale needs its maximum
    i = tl.arange(0, BLOCK)
    ok = i < F
    g = tl.load(gu_ptr + row * 2 * F + i, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * F + F + i, mask=ok, other=0.0)
    act = (g * tl.sigmoid(g)).to(u.dtype)
    y = (act.to(tl.float32) * u.to(tl.float32)).to(u.dtype)
    quantize_row(y, q_ptr + row * F, s_ptr + row, i, ok, FP8)


def swiglu_halves_rows(gate_up: Tensor, fp8: bool = False) -> tuple[Tensor, Tensor]:
    """:func:`swiglu_halves` quantized per row: ``(q (rows, F), scale float32 (rows,))``,
    int8 or float8, as :func:`add_rms_norm_rows` quantizes."""
    F2 = gate_up.shape[-1]
    gu = gate_up.reshape(-1, F2).contiguous()  # (rows, 2F)
    rows, F = gu.shape[0], F2 // 2
    q = torch.empty(rows, F, dtype=row_format(fp8), device=gu.device)
    scale = torch.empty(rows, dtype=torch.float32, device=gu.device)
    block = triton.next_power_of_2(F)
    _swiglu_rows_kernel[(rows,)](gu, q, scale, F, BLOCK=block, FP8=fp8,
                                 num_warps=min(16, max(4, block // 1024)),
                                 **pdl_args(gu.device))
    return q, scale


def swiglu_halves(gate_up: Tensor) -> Tensor:
    """``silu(gate) * up`` of a fused gate/up product ``(..., 2F)``: gate first, then up."""
    return _swiglu_halves(gate_up, amax=False)[0]


def swiglu_halves_amax(gate_up: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`swiglu_halves`, and the largest magnitude of each 1 024-column chunk of a row
    (float32; their maximum is ``max |y|``, the float8 input scale of the MLP's down product)."""
    return _swiglu_halves(gate_up, amax=True)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` (Shazeer 2020), both contiguous and of one 16-bit dtype."""
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty_like(up)
    n = up.numel()
    _swiglu_kernel[(triton.cdiv(n, 1024),)](gate, up, y, n, BLOCK=1024, **pdl_args(up.device))
    return y
