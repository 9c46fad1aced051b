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

int4 kernel, built for the 32-64 rows of a cached step (measurements in
docs/decisions.md):

* **decoding is the bottleneck, not bytes**: decoded one value at a time
  (shift, mask, convert, subtract, scale: ~8 instructions per weight) the
  kernel ran at 10-25% of memory bandwidth whatever its tiles. Here one
  inline-PTX call decodes 4 bytes (8 values) with 32-bit and paired 16-bit
  instructions (``prmt`` spreads two bytes into the halves of a register, a
  mask and an OR put a nibble ``u`` under the exponent of ``BIAS``, so the
  16-bit pattern is the float ``BIAS + u``; one paired FMA subtracts ``BIAS + 8``,
  one multiplies by the scale): ~2.6 instructions per weight (the
  magic-number decoding of FasterTransformer's and Marlin's int4 kernels);
  the result is rounded as :func:`ruvdllm.quant.dequantize_int4` rounds;
* **swapped operands** (``yᵀ = W xᵀ``): the weight tile is the left operand
  of ``tl.dot``, so the stored row-major layout is read as it lies (16-byte
  loads along K) and the small M is the product's narrow side;
* **one tile of rows** covers M (≤ 64), so each weight tile is decoded once;
* **fixed tiles per shape** (:func:`_int4_config`), measured on the H100 for
  the 8B shapes; split-K with float32 atomics (the split-K idea of CUTLASS)
  only where a long K leaves few column tiles;
* from 128 rows a Triton dequantization followed by cuBLAS (the product is no
  longer bound by weight bytes), where the transient 16-bit weight is small.

(No ``from __future__ import annotations`` here: Triton reads the kernels'
``tl.constexpr`` annotations as objects.)
"""

import inspect
from collections.abc import Callable
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


def _decode_asm(dtype: torch.dtype) -> str:
    """Inline PTX decoding 4 int4-packed bytes ($4) with their scales ($5, $6).

    Outputs: $0/$1 the low nibbles of bytes 0-1 / 2-3, $2/$3 the high nibbles,
    each a pair of 16-bit floats ``(v) * scale``; ``v = u - 8`` where ``u`` is
    the nibble after flipping its top bit (so the signed nibble ``v`` maps to
    ``u = v + 8`` in 0..15, exact as ``BIAS + u``).
    """
    if dtype == torch.bfloat16:  # BIAS 128: 0x4300; 1.0; -(128 + 8); -0.0
        magic, one, bias, neg_zero, fma = "0x43004300", "0x3F803F80", "0xC308C308", \
            "0x80008000", "fma.rn.bf16x2"
    else:  # float16, BIAS 1024: 0x6400; 1.0; -(1024 + 8); -0.0
        magic, one, bias, neg_zero, fma = "0x64006400", "0x3C003C00", "0xE408E408", \
            "0x80008000", "fma.rn.f16x2"
    lines = [
        "{", ".reg .b32 r, t0, t1, a, one, bias, nz, z;",
        f"mov.b32 one, {one};", f"mov.b32 bias, {bias};", f"mov.b32 nz, {neg_zero};",
        "mov.b32 z, 0;",
        "xor.b32 r, $4, 0x88888888;",  # every nibble v -> v + 8
        "prmt.b32 t0, r, z, 0x4140;",  # bytes 0, 1 into the two 16-bit halves
        "prmt.b32 t1, r, z, 0x4342;",  # bytes 2, 3
    ]
    for out, src, scale in (("$0", "t0", "$5"), ("$1", "t1", "$6"), ("$2", "t0", "$5"),
                            ("$3", "t1", "$6")):
        if out == "$2":
            lines += ["shr.b32 t0, t0, 4;", "shr.b32 t1, t1, 4;"]  # the high nibbles
        lines += [f"and.b32 a, {src}, 0x000F000F;", f"or.b32 a, a, {magic};",
                  f"{fma} a, a, one, bias;", f"{fma} {out}, a, {scale}, nz;"]
    return "\n".join([*lines, "}"])


_ASM = {torch.bfloat16: _decode_asm(torch.bfloat16), torch.float16: _decode_asm(torch.float16)}


@triton.jit
def _int4_tile(w_ptr, s_ptr, rn, n_ok, it, stride_wn, stride_sn,  # type: ignore[no-untyped-def]
               DTYPE: tl.constexpr, ASM: tl.constexpr, GROUP: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Weight tile ``(BLOCK_N, BLOCK_K)`` of K iteration ``it``, dequantized to DTYPE."""
    rj = tl.arange(0, BLOCK_K // 2)
    rg = tl.arange(0, BLOCK_K // GROUP)
    p = tl.load(w_ptr + rn[:, None] * stride_wn + (it * (BLOCK_K // 2) + rj)[None, :],
                mask=n_ok[:, None], other=0)  # (BN, BK/2) uint8, two nibbles each
    s = tl.load(s_ptr + rn[:, None] * stride_sn + (it * (BLOCK_K // GROUP) + rg)[None, :],
                mask=n_ok[:, None], other=0.0).to(DTYPE)  # (BN, BK/G)
    s = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, BLOCK_K // GROUP, GROUP // 2)),
                   (BLOCK_N, BLOCK_K // 2))  # (BN, BK/2): each byte's scale
    low, high = tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r,r,r", [p, s],
                                          dtype=(s.dtype, s.dtype), is_pure=True, pack=4)
    return tl.reshape(tl.join(low, high), (BLOCK_N, BLOCK_K))  # columns 2j, 2j+1 interleaved


@triton.jit
def _int4_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K,  # type: ignore[no-untyped-def]
                 stride_xm, stride_wn, stride_sn, stride_ym, SPLIT_K,
                 ASM: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr):
    """``yᵀ`` tile ``(BLOCK_N, BLOCK_M)`` = weight tile times ``xᵀ``, over one K slice."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    m_ok = rm < M
    iters = K // BLOCK_K
    per_split = tl.cdiv(iters, SPLIT_K)
    it_lo = pid_k * per_split
    it_hi = tl.minimum(it_lo + per_split, iters)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for it in range(it_lo, it_hi):
        w = _int4_tile(w_ptr, s_ptr, rn, n_ok, it, stride_wn, stride_sn,
                       x_ptr.dtype.element_ty, ASM, GROUP, BLOCK_N, BLOCK_K)
        xt = tl.load(x_ptr + rm[None, :] * stride_xm + (it * BLOCK_K + rk)[:, None],
                     mask=m_ok[None, :], other=0.0)  # (BK, BM)
        acc = tl.dot(w, xt, acc)
    y = y_ptr + rm[None, :] * stride_ym + rn[:, None]
    ok = n_ok[:, None] & m_ok[None, :]
    if ATOMIC:
        tl.atomic_add(y, acc, mask=ok)
    else:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _int4_dequant_kernel(w_ptr, s_ptr, y_ptr, N, K,  # type: ignore[no-untyped-def]
                         stride_wn, stride_sn, ASM: tl.constexpr, GROUP: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The whole weight ``(N, K)`` dequantized (for large M: then one cuBLAS product)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    it = tl.program_id(1)
    n_ok = rn < N
    w = _int4_tile(w_ptr, s_ptr, rn, n_ok, it, stride_wn, stride_sn, y_ptr.dtype.element_ty,
                   ASM, GROUP, BLOCK_N, BLOCK_K)
    tl.store(y_ptr + rn[:, None] * K + (it * BLOCK_K + tl.arange(0, BLOCK_K))[None, :], w,
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


def _int4_config(m: int, N: int, K: int) -> tuple[int, int, int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, split)`` of the fused kernel.

    Measured on the H100 for the 8B shapes (bench/int4_sweep.py; docs/decisions.md):
    up to 32 rows, 32-column tiles 256 wide in K keep enough programs in flight,
    except for the wide products (fused gate/up, LM head: 64 x 128); at 64 rows
    64-column tiles; the long-K product (MLP down, K = 12 288) splits K in two.
    """
    wide = N >= 20_000
    if m <= 32:
        bm = max(16, _bucket(m))
        return (bm, 64, 128, 4, 4, 1) if wide else (bm, 32, 256, 4, 4, 1)
    if m <= 64:
        if wide:
            return 64, 64, 128, 4, 3, 1
        return (64, 64, 256, 4, 3, 2) if K >= 8192 else (64, 64, 256, 4, 4, 1)
    return 128, 64, 128, 8, 3, 1


def _block_k(K: int, group: int, want: int) -> int:
    """The largest K tile up to ``want`` that divides K and holds whole groups."""
    bk = want
    while bk > group and K % bk:
        bk //= 2
    if K % bk or bk % group:
        raise ValueError(f"int4 kernel: K={K} is no multiple of the group size {group}")
    return bk


def _int4_fused(x: Tensor, packed: Tensor, scales: Tensor) -> Tensor:
    """The fused kernel (float32 atomics where its configuration splits K)."""
    M, K = x.shape
    N = packed.shape[0]
    group = K // scales.shape[1]
    bm, bn, bk, warps, stages, split = _int4_config(M, N, K)
    bk = _block_k(K, group, bk)
    split = min(split, K // bk)
    y = (torch.zeros(M, N, dtype=torch.float32, device=x.device) if split > 1
         else torch.empty(M, N, dtype=x.dtype, device=x.device))
    grid = (triton.cdiv(N, bn), split, triton.cdiv(M, bm))
    _int4_kernel[grid](x, packed, scales, y, M, N, K, x.stride(0), packed.stride(0),
                       scales.stride(0), y.stride(0), split, ASM=_ASM[x.dtype], GROUP=group,
                       BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, ATOMIC=split > 1,
                       num_warps=warps, num_stages=stages)
    return y.to(x.dtype)


def int4_dequantize(packed: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """The int4 weight as ``(N, K)`` of ``dtype`` (16-bit), decoded as the fused kernel does."""
    N, K = packed.shape[0], packed.shape[1] * 2
    group = K // scales.shape[1]
    bk = _block_k(K, group, 128)
    y = torch.empty(N, K, dtype=dtype, device=packed.device)
    _int4_dequant_kernel[(triton.cdiv(N, 64), K // bk)](
        packed, scales, y, N, K, packed.stride(0), scales.stride(0), ASM=_ASM[dtype],
        GROUP=group, BLOCK_N=64, BLOCK_K=bk)
    return y


# Largest transient 16-bit weight of the dequantize path: every linear of the 8B shape
# (fused q/k/v and gate/up too) but the LM head (1 GB), where the fused kernel is used.
_DEQUANT_MAX_BYTES = 256 << 20
_DEQUANT_MIN_ROWS = 128  # below, the fused kernel measured faster inside the step graphs


def uses_dequantize(m: int, packed: Tensor) -> bool:
    """Whether :func:`int4_matmul` dequantizes for cuBLAS at ``m`` rows."""
    return m >= _DEQUANT_MIN_ROWS and packed.numel() * 4 <= _DEQUANT_MAX_BYTES


def int4_matmul(x: Tensor, packed: Tensor, scales: Tensor) -> Tensor:
    """``x`` ``(M, K)`` times the int4 weight ``(N, K/2)`` transposed: ``(M, N)`` in x's dtype.

    The fused kernel up to 127 rows (and for weights too large to dequantize);
    from 128 rows Triton dequantization followed by cuBLAS.
    """
    if x.dtype not in _ASM:
        raise ValueError(f"int4_matmul takes bfloat16 or float16 activations, got {x.dtype}")
    x = x.contiguous()
    if uses_dequantize(x.shape[0], packed):
        return F.linear(x, int4_dequantize(packed, scales, x.dtype))
    return _int4_fused(x, packed, scales)


def int8_matmul(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """``x`` ``(M, K)`` times the int8 weight ``(N, K)`` transposed, row scales applied."""
    M, K = x.shape
    N = weight.shape[0]
    x = x.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    _int8_kernel[_grid(M, N)](x, weight, scales, y, M, N, K, _bucket(M),
                              x.stride(0), weight.stride(0), y.stride(0))
    return y
