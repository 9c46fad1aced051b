"""Dynamic float8 (e4m3) quantization of activations on the GPU (Triton), for W8A8 products.

A W8A8 product (:class:`ruvdllm.quant.Fp8Linear`) quantizes its input with one
scale for the whole tensor just before ``torch._scaled_mm`` multiplies it with
the float8 weight on Hopper's float8 tensor cores. In eager PyTorch that is a
division, a clamp and a cast (three kernels after the maximum); at a cached
step's 32-64 rows each kernel is mostly launch, four products per layer. Here
it is one kernel, which reads the maximum from device memory (no host
synchronisation, so it can be captured in a CUDA graph): maxima that the
producing kernel wrote (RMSNorm and SwiGLU write their rows', which spares a
reduction), or one reduction (``torch.linalg.vector_norm(x, inf)``).

(No ``from __future__ import annotations`` here: Triton reads the kernels'
``tl.constexpr`` annotations as objects.)
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from ruvdllm.quant import FP8_MAX

_BLOCK = 4096
# Up to this many partial maxima each program reduces them itself (a cached step's
# 32-64 rows); beyond, one small reduction first (a batch's or a whole sequence's rows).
_INLINE_MAXIMA = 1024


@triton.jit
def _quantize_kernel(x_ptr, amax_ptr, n_amax, q_ptr, s_ptr, n,  # type: ignore[no-untyped-def]
                     TINY: tl.constexpr, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr,
                     AMAX_BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    r = tl.arange(0, AMAX_BLOCK)
    maxima = tl.load(amax_ptr + r, mask=r < n_amax, other=0.0).to(tl.float32)
    # IEEE divisions (Triton's `/` is approximate): the same scale and values as torch's
    scale = tl.div_rn(tl.maximum(tl.max(maxima, axis=0), TINY), FP8_MAX)
    x = tl.load(x_ptr + i, mask=ok, other=0.0).to(tl.float32)
    q = tl.clamp(tl.div_rn(x, scale), -FP8_MAX, FP8_MAX)
    tl.store(q_ptr + i, q.to(q_ptr.dtype.element_ty), mask=ok)
    if tl.program_id(0) == 0:
        tl.store(s_ptr, scale)


def quantize_tensor(x: Tensor, tiny: float, amax: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(q float8_e4m3fn of x's shape, scale float32 ())`` with ``x ≈ q * scale``.

    ``scale = max(max |x|, tiny) / 448``: the largest magnitude maps to e4m3's
    largest finite value. ``x`` is a contiguous CUDA tensor. ``amax``: partial
    maxima of ``|x|`` (1-D) from the kernel that produced ``x``
    (:func:`ruvdllm.kernels.elementwise.add_rms_norm`), which spare the reduction.
    """
    if amax is None:
        amax = torch.linalg.vector_norm(x, ord=float("inf")).reshape(1)  # exact in x's dtype
    elif amax.numel() > _INLINE_MAXIMA:  # every program would re-read them all
        amax = amax.amax().reshape(1)
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((), dtype=torch.float32, device=x.device)
    n = x.numel()
    _quantize_kernel[(triton.cdiv(n, _BLOCK),)](
        x, amax, amax.numel(), q, scale, n, TINY=tiny, FP8_MAX=FP8_MAX, BLOCK=_BLOCK,
        AMAX_BLOCK=max(16, triton.next_power_of_2(amax.numel())))
    return q, scale
