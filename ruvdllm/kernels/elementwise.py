"""Fused element-wise kernels of a transformer block (Triton): RMSNorm, RoPE, SwiGLU.

Why: in eager PyTorch each of these is several kernels (RMSNorm: upcast, square,
mean, rsqrt, two products, downcast; RoPE: upcast, chunk, negate, concatenate,
two products, a sum, downcast; SwiGLU: SiLU and a product), about 30 per layer.
At a cached denoising step every kernel moves little data, so inside a CUDA graph
each still costs a launch slot of a few microseconds: ~1 000 per step of the 8B
shape, against a weight-read floor of 1.4 ms (int4). One kernel per operation
reads its inputs once and writes once. Each computes in float32 and rounds where
the eager code rounds, so results match it up to float32 contraction.

(No ``from __future__ import annotations`` here: Triton reads the kernels'
``tl.constexpr`` annotations as objects.)
"""

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, D, eps,  # type: ignore[no-untyped-def]
                     BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=ok, other=0.0).to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    normed = (x * inv).to(w.dtype)  # the eager path rounds here, then scales
    tl.store(y_ptr + row * D + cols, (normed.to(tl.float32) * w.to(tl.float32)).to(w.dtype),
             mask=ok)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``RMSNorm`` (Zhang & Sennrich 2019) over the last dimension; ``x`` and ``weight`` 16-bit."""
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()  # (rows, D)
    y = torch.empty_like(x2)
    _rms_norm_kernel[(x2.shape[0],)](x2, weight, y, D, eps, BLOCK=triton.next_power_of_2(D))
    return y.view(x.shape)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, H, T,  # type: ignore[no-untyped-def]
                 sxb, sxh, sxt, scb, sct, HALF: tl.constexpr):
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
                             cos.stride(0), cos.stride(2), HALF=hd // 2)
    return y


@triton.jit
def _swiglu_kernel(g_ptr, u_ptr, y_ptr, n, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    g = tl.load(g_ptr + i, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + i, mask=ok, other=0.0)
    act = (g * tl.sigmoid(g)).to(u.dtype)  # SiLU, rounded as the eager path rounds it
    tl.store(y_ptr + i, (act.to(tl.float32) * u.to(tl.float32)).to(u.dtype), mask=ok)


@triton.jit
def _swiglu_halves_kernel(gu_ptr, y_ptr, F, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    row = tl.program_id(0)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = i < F
    g = tl.load(gu_ptr + row * 2 * F + i, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * F + F + i, mask=ok, other=0.0)
    act = (g * tl.sigmoid(g)).to(u.dtype)
    tl.store(y_ptr + row * F + i, (act.to(tl.float32) * u.to(tl.float32)).to(u.dtype), mask=ok)


def swiglu_halves(gate_up: Tensor) -> Tensor:
    """``silu(gate) * up`` of a fused gate/up product ``(..., 2F)``: gate first, then up."""
    F2 = gate_up.shape[-1]
    gu = gate_up.reshape(-1, F2).contiguous()  # (rows, 2F)
    y = torch.empty(gu.shape[0], F2 // 2, dtype=gu.dtype, device=gu.device)
    _swiglu_halves_kernel[(gu.shape[0], triton.cdiv(F2 // 2, 1024))](gu, y, F2 // 2, BLOCK=1024)
    return y.view(*gate_up.shape[:-1], F2 // 2)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` (Shazeer 2020), both contiguous and of one 16-bit dtype."""
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty_like(up)
    n = up.numel()
    _swiglu_kernel[(triton.cdiv(n, 1024),)](gate, up, y, n, BLOCK=1024)
    return y
