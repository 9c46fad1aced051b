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
docs/decisions.md; ``bench/int4_sweep.py`` chooses the tiles):

* **decoding**: one inline-PTX call decodes 4 bytes into 4 registers, each
  the pair (low, high nibble) of one byte as 16-bit floats times the scale:
  ``prmt`` puts the byte and the byte shifted by 4 into the two halves of a
  register, one ``lop3`` masks the nibbles under the exponent of ``BIAS`` (the
  16-bit pattern is then the float ``BIAS + u``), one paired FMA subtracts
  ``BIAS + 8`` exactly, one multiplies by the scale: ~2.25 instructions per
  weight (the magic-number decoding of FasterTransformer's and Marlin's int4
  kernels), rounded as :func:`ruvdllm.quant.dequantize_int4` rounds. A
  register already holds two neighbouring columns, so no shuffle interleaves
  the nibbles afterwards;
* **swapped operands** (``yᵀ = W xᵀ``): the decoded weight tile is the left
  operand of ``tl.dot``, straight from registers, and the small M is the
  product's narrow side;
* **one tile of rows** covers M up to 64, so each weight tile is decoded once
  (above, tiles of 128 rows);
* **offsets as tile index times a constant**, so Triton knows the scales'
  alignment and copies them asynchronously in its pipeline with the bytes;
* **split-K** with float32 atomics (the split-K idea of CUTLASS) where N alone
  leaves too few programs for the 132 multiprocessors;
* tiles and splits per shape from a sweep timed as the fast path runs the
  products (``bench/int4_sweep.py``: CUDA-graph replays, weights not in L2);
* above 256 rows, for K = 4 096, a Triton dequantization followed by cuBLAS
  (the product is no longer bound by weight bytes), in column chunks of at most
  ``_DEQUANT_CHUNK_BYTES`` so the transient 16-bit weight stays small.

(No ``from __future__ import annotations`` here: Triton reads the kernels'
``tl.constexpr`` annotations as objects.)
"""

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

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
    """Inline PTX decoding 4 int4-packed bytes ($4) with their scales ($5-$8).

    Output ``$i`` is byte ``i``'s pair (low nibble, high nibble) as two 16-bit
    floats ``v * scale`` (low half first: columns ``2j, 2j+1``), with the scale
    pair ``(s, s)`` of input ``$(5+i)``; ``v = u - 8`` where ``u`` is the nibble
    after flipping its top bit (so the signed nibble ``v`` maps to ``u = v + 8``
    in 0..15, exact as ``BIAS + u``). Elementwise: output ``i`` reads only input
    byte ``i`` and scale ``i``, as ``tl.inline_asm_elementwise`` requires.
    """
    if dtype == torch.bfloat16:  # BIAS 128: 0x4300; 1.0; -(128 + 8)
        magic, one, bias, fma = "0x43004300", "0x3F803F80", "0xC308C308", "fma.rn.bf16x2"
    else:  # float16, BIAS 1024: 0x6400; 1.0; -(1024 + 8)
        magic, one, bias, fma = "0x64006400", "0x3C003C00", "0xE408E408", "fma.rn.f16x2"
    lines = [
        "{", ".reg .b32 r, h, t, one, bias, nz;",
        f"mov.b32 one, {one};", f"mov.b32 bias, {bias};", "mov.b32 nz, 0x80008000;",
        "xor.b32 r, $4, 0x88888888;",  # every nibble v -> v + 8
        "shr.b32 h, r, 4;",  # each byte's high nibble in its low 4 bits
    ]
    for i in range(4):
        select = i | i << 4 | (4 + i) << 8 | (4 + i) << 12  # byte i of r, then of h
        lines += [f"prmt.b32 t, r, h, {select:#06x};",
                  f"lop3.b32 t, t, 0x000F000F, {magic}, 0xEA;",  # (t & mask) | magic
                  f"{fma} t, t, one, bias;", f"{fma} ${i}, t, ${5 + i}, nz;"]
    return "\n".join([*lines, "}"])


_ASM = {torch.bfloat16: _decode_asm(torch.bfloat16), torch.float16: _decode_asm(torch.float16)}


@triton.jit
def _int4_load(w_ptr, s_ptr, rn, n_ok, it, stride_wn, stride_sn,  # type: ignore[no-untyped-def]
               GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """Packed bytes ``(BLOCK_N, BLOCK_K / 2)`` and scales ``(BLOCK_N, BLOCK_K / GROUP)`` of
    K tile ``it``.

    Offsets are written as ``it`` times a constant so that Triton knows their
    alignment: the scale rows of a tile (16 bytes at BLOCK_K 256) then load with
    asynchronous copies inside its pipeline; written as ``k0 // GROUP`` they
    were loaded synchronously every iteration (measured: 57.7 against 39.7 µs,
    4 096 x 12 288 at M = 64).
    """
    rj = tl.arange(0, BLOCK_K // 2)
    rg = tl.arange(0, BLOCK_K // GROUP)
    p = tl.load(w_ptr + rn[:, None] * stride_wn + (it * (BLOCK_K // 2) + rj)[None, :],
                mask=n_ok[:, None], other=0)
    s = tl.load(s_ptr + rn[:, None] * stride_sn + (it * (BLOCK_K // GROUP) + rg)[None, :],
                mask=n_ok[:, None], other=0.0)
    return p, s


@triton.jit
def _int4_decode(p, s, DTYPE: tl.constexpr, ASM: tl.constexpr,  # type: ignore[no-untyped-def]
                 GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Weight tile ``(BLOCK_N, BLOCK_K)`` of DTYPE from :func:`_int4_load`'s bytes and scales."""
    s = s.to(DTYPE)
    half = s.dtype
    s = s.to(tl.uint16, bitcast=True).to(tl.uint32) * 65537  # (BN, BK/G): pairs (s, s)
    s = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, BLOCK_K // GROUP, GROUP // 2)),
                   (BLOCK_N, BLOCK_K // 2))  # (BN, BK/2): each byte's scale pair
    pairs = tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r,r,r,r,r", [p, s], dtype=tl.uint32,
                                      is_pure=True, pack=4)  # (BN, BK/2): columns 2j, 2j+1
    low, high = tl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [pairs],
                                          dtype=(half, half), is_pure=True, pack=1)
    return tl.reshape(tl.join(low, high), (BLOCK_N, BLOCK_K))  # the halves of one register


@triton.jit
def _int4_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K,  # type: ignore[no-untyped-def]
                 stride_xm, stride_wn, stride_sn, stride_ym,
                 ASM: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """``yᵀ`` tile ``(BLOCK_N, BLOCK_M)`` = weight tile times ``xᵀ``, over one K slice."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    m_ok = rm < M
    per_split = K // BLOCK_K // SPLIT_K  # the host makes SPLIT_K divide the K tiles
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for it in range(pid_k * per_split, (pid_k + 1) * per_split):
        p, s = _int4_load(w_ptr, s_ptr, rn, n_ok, it, stride_wn, stride_sn, GROUP, BLOCK_K)
        w = _int4_decode(p, s, x_ptr.dtype.element_ty, ASM, GROUP, BLOCK_N, BLOCK_K)
        xt = tl.load(x_ptr + rm[None, :] * stride_xm + (it * BLOCK_K + rk)[:, None],
                     mask=m_ok[None, :], other=0.0)  # (BK, BM)
        acc = tl.dot(w, xt, acc)
    store_tile(y_ptr, acc, rn, rm, n_ok, m_ok, stride_ym, SPLIT_K > 1)


@triton.jit
def store_tile(y_ptr, acc, rn, rm, n_ok, m_ok, stride_ym,  # type: ignore[no-untyped-def]
               ADD: tl.constexpr):
    """Write the ``yᵀ`` tile ``acc`` ``(BN, BM)`` into ``y`` ``(M, N)``: with ``ADD``
    (K split) added with float32 atomics (into :func:`split_k_output`'s zeros), else stored."""
    y = y_ptr + rm[None, :] * stride_ym + rn[:, None]
    ok = n_ok[:, None] & m_ok[None, :]
    if ADD:
        tl.atomic_add(y, acc, mask=ok, sem="relaxed")
    else:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=ok)


def split_k_output(M: int, N: int, split: int, dtype: torch.dtype, device: torch.device,
                   partials: bool = False) -> Tensor:
    """The output a kernel ending in :func:`store_tile` writes: ``(M, N)`` float32 zeros
    to add the K slices into when ``split > 1`` (converted to ``dtype`` after), else
    ``dtype``; with ``partials`` one ``(M, N)`` term per slice, ``(split, M, N)``
    (float32 when ``split > 1``), each stored, not added."""
    if partials:
        return torch.empty(split, M, N, dtype=torch.float32 if split > 1 else dtype,
                           device=device)
    if split > 1:
        return torch.zeros(M, N, dtype=torch.float32, device=device)
    return torch.empty(M, N, dtype=dtype, device=device)


@triton.jit
def _int4_dequant_kernel(w_ptr, s_ptr, y_ptr, N, K,  # type: ignore[no-untyped-def]
                         stride_wn, stride_sn, ASM: tl.constexpr, GROUP: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The weight ``(N, K)`` dequantized (for large M: then one cuBLAS product)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    it = tl.program_id(1)
    n_ok = rn < N
    p, s = _int4_load(w_ptr, s_ptr, rn, n_ok, it, stride_wn, stride_sn, GROUP, BLOCK_K)
    w = _int4_decode(p, s, y_ptr.dtype.element_ty, ASM, GROUP, BLOCK_N, BLOCK_K)
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


class Int4Config(NamedTuple):
    """Tiles of the fused int4 kernel: rows (x), columns (weight), K; launch shape."""

    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int
    split_k: int


def _int4_config(m: int, N: int, K: int) -> Int4Config:
    """The fused kernel's configuration for ``m`` rows of an ``(N, K)`` weight.

    From the H100 sweep of every 8B shape at 32 and 64 rows (bench/int4_sweep.py,
    docs/decisions.md): 64-column tiles, 4 warps, 3 stages throughout; K tiles of
    128 (256 for N = 4 096 at 64 rows); split-K so that about 256 programs run
    (N = 4 096: 4 at 32 rows, 2 at 64; N = 12 288: 2). Above 64 rows (where
    :func:`uses_dequantize` does not take cuBLAS): 128 rows x 64 columns x 128.
    """
    if m > 64:
        return Int4Config(128, 64, 128, 4, 3, 1)
    tiles = triton.cdiv(N, 64)
    if m <= 32:
        split = 4 if tiles <= 64 else 2 if tiles <= 192 else 1
        return Int4Config(max(16, _bucket(m)), 64, 128, 4, 3, split)
    split = 2 if tiles <= 192 else 1
    return Int4Config(64, 64, 256 if tiles <= 64 else 128, 4, 3, split)


def _block_k(K: int, group: int, want: int) -> int:
    """The largest K tile up to ``want`` that divides K and holds whole groups."""
    bk = want
    while bk > group and K % bk:
        bk //= 2
    if K % bk or bk % group:
        raise ValueError(f"int4 kernel: K={K} is no multiple of the group size {group}")
    return bk


def _int4_fused(x: Tensor, packed: Tensor, scales: Tensor,
                cfg: Int4Config | None = None) -> Tensor:
    """The fused kernel (float32 atomics where the configuration splits K)."""
    M, K = x.shape
    N = packed.shape[0]
    group = K // scales.shape[1]
    bm, bn, bk, warps, stages, split = cfg or _int4_config(M, N, K)
    bk = _block_k(K, group, bk)
    while split > 1 and (K // bk) % split:
        split //= 2
    y = split_k_output(M, N, split, x.dtype, x.device)
    grid = (triton.cdiv(N, bn), split, triton.cdiv(M, bm))
    _int4_kernel[grid](x, packed, scales, y, M, N, K, x.stride(0), packed.stride(0),
                       scales.stride(0), y.stride(0), ASM=_ASM[x.dtype], GROUP=group,
                       BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=warps,
                       num_stages=stages)
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


# Dequantize + cuBLAS only above _FUSED_MAX_ROWS rows, for weights of K < 8 192 up to
# _DEQUANT_MAX_BYTES in 16 bits. Measured on the H100 (bench/int4_sweep.py, graph-timed):
# up to 256 rows the fused kernel is faster on every 8B shape (24 576 x 4 096 at 256
# rows: 122 vs 196 µs); at 384-512 rows cuBLAS is ahead for K = 4 096 (12 288 x 4 096
# at 384: 106 vs 114 µs) but not for the MLP down product (K = 12 288: 107 vs 132 µs),
# nor for the LM head (1 GB in 16 bits; 618 vs 1 013 µs at 256 rows).
_DEQUANT_MAX_BYTES = 256 << 20
_FUSED_MAX_ROWS = 256
# The 16-bit weight is made and used in column chunks of at most this many bytes: the
# transient stays small (W4 peak-memory goal; 24 576 x 4 096 was one 201 MB copy).
_DEQUANT_CHUNK_BYTES = 64 << 20


def uses_dequantize(m: int, packed: Tensor) -> bool:
    """Whether :func:`int4_matmul` dequantizes for cuBLAS at ``m`` rows."""
    return (m > _FUSED_MAX_ROWS and packed.shape[1] * 2 < 8192
            and packed.numel() * 4 <= _DEQUANT_MAX_BYTES)


def _int4_dequant_matmul(x: Tensor, packed: Tensor, scales: Tensor) -> Tensor:
    """``x Wᵀ`` through cuBLAS, the weight dequantized in chunks of output columns."""
    N, K = packed.shape[0], packed.shape[1] * 2
    rows = max(64, _DEQUANT_CHUNK_BYTES // (2 * K) // 64 * 64)  # output columns per chunk
    if rows >= N:
        return F.linear(x, int4_dequantize(packed, scales, x.dtype))
    y = torch.empty(x.shape[0], N, dtype=x.dtype, device=x.device)
    for n0 in range(0, N, rows):
        w = int4_dequantize(packed[n0:n0 + rows], scales[n0:n0 + rows], x.dtype)
        torch.mm(x, w.t(), out=y[:, n0:n0 + rows])  # (M, chunk): a column block of y
    return y


def int4_matmul(x: Tensor, packed: Tensor, scales: Tensor) -> Tensor:
    """``x`` ``(M, K)`` times the int4 weight ``(N, K/2)`` transposed: ``(M, N)`` in x's dtype.

    The fused kernel at few rows; at many (:func:`uses_dequantize`) Triton
    dequantization followed by cuBLAS, chunked over the output columns.
    """
    if x.dtype not in _ASM:
        raise ValueError(f"int4_matmul takes bfloat16 or float16 activations, got {x.dtype}")
    x = x.contiguous()
    if uses_dequantize(x.shape[0], packed):
        return _int4_dequant_matmul(x, packed, scales)
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
