"""Per-row (per-token) activation quantization on the GPU (Triton): int8 rows for W4A8
products, float8 (e4m3) rows for W8A8 products.

One scale per row, symmetric, ``max |x| -> 127`` (int8; LLM.int8's and SmoothQuant's
per-token scheme) or ``max |x| -> 448`` (float8). A row's scale needs only the row, so
the kernel that computes a row can also quantize it from registers:
:func:`quantize_row` is called by the RMSNorm and SwiGLU kernels
(:mod:`ruvdllm.kernels.elementwise`), whose 16-bit output is then never written; this
module's own kernel quantizes any other input (the attention output). A scale for the
whole tensor (:mod:`ruvdllm.kernels.fp8`) needs every row's maximum first: a reduction
and a separate quantization kernel.

Both formats are bit for bit :func:`ruvdllm.quant.quantize_activations_int8` and
:func:`ruvdllm.quant.quantize_fp8_rows` (the row's reciprocal by IEEE division, since
Triton's ``/`` is approximate; float8 rounds to nearest even).

(No ``from __future__ import annotations`` here: Triton reads the kernels'
``tl.constexpr`` annotations as objects.)
"""

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

from ruvdllm.kernels.pdl import pdl_args, wait_inputs
from ruvdllm.quant import ACT_FLOOR, FP8_MAX

_FLOOR = tl.constexpr(ACT_FLOOR)
_FP8_MAX = tl.constexpr(FP8_MAX)


@triton.jit
def quantize_row(x, q_ptr, s_ptr, cols, ok, FP8: tl.constexpr):  # type: ignore[no-untyped-def]
    """Store the row ``x`` (registers) quantized at ``q_ptr + cols``, its scale at ``s_ptr``.

    ``peak = max(max |x|, ACT_FLOOR)``; int8: ``scale = peak / 127``, ``q = rint(x *
    (127 / peak))`` (ties to even); float8: ``scale = peak / 448``, ``q = e4m3(x * (1 /
    scale))``, clamped to the finite range. One reciprocal per row,
    not a division per element: with one, the SwiGLU kernel took 8.4 ms of an 8-step B=8
    run against 4.0 ms without quantization (docs/decisions.md, session 9).
    """
    xf = x.to(tl.float32)
    peak = tl.maximum(tl.max(tl.abs(xf), axis=0), _FLOOR)
    if FP8:
        scale = tl.div_rn(peak, _FP8_MAX)
        q = tl.clamp(xf * tl.div_rn(1.0, scale), -_FP8_MAX, _FP8_MAX)
        tl.store(q_ptr + cols, q.to(q_ptr.dtype.element_ty), mask=ok)
        tl.store(s_ptr, scale)
    else:
        q = libdevice.rint(xf * tl.div_rn(127.0, peak))  # |q| <= 127
        tl.store(q_ptr + cols, q.to(tl.int8), mask=ok)
        tl.store(s_ptr, tl.div_rn(peak, 127.0))


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm,  # type: ignore[no-untyped-def]
                          FP8: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_inputs(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < K
    x = tl.load(x_ptr + row * stride_xm + cols, mask=ok, other=0.0)
    quantize_row(x, q_ptr + row * stride_qm, s_ptr + row, cols, ok, FP8)


def row_format(fp8: bool) -> torch.dtype:
    """The quantized rows' dtype: float8 e4m3 or int8."""
    return torch.float8_e4m3fn if fp8 else torch.int8


def quantize_rows(x: Tensor, fp8: bool = False) -> tuple[Tensor, Tensor]:
    """``(q (M, K), scale float32 (M,))`` with ``x[m] ≈ q[m] * scale[m]``: int8, or float8
    with ``fp8`` (:func:`quantize_row`)."""
    M, K = x.shape
    q = torch.empty(M, K, dtype=row_format(fp8), device=x.device)
    scale = torch.empty(M, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(K)
    _quantize_rows_kernel[(M,)](x, q, scale, K, x.stride(0), q.stride(0), FP8=fp8,
                                BLOCK=block, num_warps=4 if block <= 4096 else 8,
                                **pdl_args(x.device))
    return q, scale
