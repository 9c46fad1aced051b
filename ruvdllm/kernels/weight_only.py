"""Weight-only int4 / int8 matrix products on the GPU (Triton), reading ruvdllm's layouts.

``y = x Wᵀ`` with ``x`` ``(M, K)`` in bfloat16/float16 and ``W`` stored as in
:mod:`ruvdllm.quant`: int4 as uint8 ``(N, K/2)`` (column ``2j`` in the low
nibble of byte ``j``, ``2j+1`` in the high one, signed) with float32 scales
``(N, K/group)``; int8 as ``(N, K)`` with one float32 scale per row. The
weight is dequantized tile by tile in registers and never written to memory,
so a product reads 0.5 (int4) or 1 (int8) byte per weight instead of 2: at
the small ``M`` of a cached denoising step the product is bound by those
bytes (the idea of Marlin, Frantar et al. 2024, here in Triton).

Why not torch's packed kernel: ``_weight_int4pack_mm`` measured slower than
bfloat16 on the H100 at these shapes (issue #6, docs/decisions.md).

int4 trick: rather than interleaving the two nibbles back into column order,
the activation tile is split into its even and odd columns and two products
are summed, ``x[:, 0::2] @ lowᵀ + x[:, 1::2] @ highᵀ``; both nibbles of a byte
share one group scale because groups are even-sized.

(No ``from __future__ import annotations`` here: Triton reads the kernels'
``tl.constexpr`` annotations as objects.)
"""

import inspect
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

# Small M (a cached block step) is bound by weight bytes and needs many programs
# in flight: narrow N tiles; large M (a whole-sequence forward) needs wide tiles.
_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (16, 32, 256, 4, 4), (32, 32, 256, 4, 4), (32, 64, 128, 4, 4), (16, 64, 256, 4, 3),
        (64, 64, 128, 4, 4), (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 64, 128, 8, 3),
        (128, 256, 64, 8, 3),
    ]
]


def _quick_bench(fn: Callable[[], object], quantiles: list[float]) -> list[float]:
    """Autotuning timer: 5 ms warm-up, 25 ms of repeats (Triton's default is 25/100)."""
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


# Triton >= 3.2 takes the timer as ``do_bench``; older versions time with their default.
_TUNE: dict[str, Any] = (
    {"do_bench": _quick_bench} if "do_bench" in inspect.signature(triton.autotune).parameters
    else {})


def _bucket(m: int) -> int:
    """Autotuning key for M: the next power of two (a new M within it reuses the choice)."""
    return 1 << max(m - 1, 1).bit_length()


@triton.autotune(configs=_CONFIGS, key=["M_BUCKET", "N", "K"], **_TUNE)
@triton.jit
def _int4_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, M_BUCKET,  # type: ignore[no-untyped-def]
                 stride_xm, stride_wn, stride_sn, stride_ym,
                 GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)  # fastest: programs sharing a weight tile run together
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rj = tl.arange(0, BLOCK_K // 2)  # byte columns of the packed weight
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :],
                    mask=(rm[:, None] < M) & ((k0 + rk)[None, :] < K), other=0.0)
        x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))  # (BM, BK/2)
        j = k0 // 2 + rj
        wmask = (j[:, None] < K // 2) & (rn[None, :] < N)
        p = tl.load(w_ptr + rn[None, :] * stride_wn + j[:, None], mask=wmask, other=0)
        s = tl.load(s_ptr + rn[None, :] * stride_sn + (j[:, None] // (GROUP // 2)),
                    mask=wmask, other=0.0)  # (BK/2, BN) the group scale of each byte
        p = p.to(tl.int32)  # sign-extends the byte; arithmetic shifts then the nibbles
        low = ((p << 28) >> 28).to(tl.float32)
        high = ((p << 24) >> 28).to(tl.float32)
        acc = tl.dot(x_even, (low * s).to(x.dtype), acc)
        acc = tl.dot(x_odd, (high * s).to(x.dtype), acc)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


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


def int4_matmul(x: Tensor, packed: Tensor, scales: Tensor) -> Tensor:
    """``x`` ``(M, K)`` times the int4 weight ``(N, K/2)`` transposed: ``(M, N)`` in x's dtype."""
    M, K = x.shape
    N = packed.shape[0]
    x = x.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    group = K // scales.shape[1]
    _int4_kernel[_grid(M, N)](x, packed.view(torch.int8), scales, y, M, N, K, _bucket(M),
                              x.stride(0), packed.stride(0), scales.stride(0), y.stride(0),
                              GROUP=group)
    return y


def int8_matmul(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """``x`` ``(M, K)`` times the int8 weight ``(N, K)`` transposed, row scales applied."""
    M, K = x.shape
    N = weight.shape[0]
    x = x.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    _int8_kernel[_grid(M, N)](x, weight, scales, y, M, N, K, _bucket(M),
                              x.stride(0), weight.stride(0), y.stride(0))
    return y
