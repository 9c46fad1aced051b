"""Weight-only int8 / int4 quantization of every linear layer.

Why weight-only: decoding a masked-diffusion model re-reads every weight at
every step, so weight bytes set the memory footprint; activations stay in the
model's float dtype, and no calibration data is needed (round-to-nearest, as the
baselines of GPTQ, Frantar et al. 2022, and AWQ, Lin et al. 2023).

* ``int8``: symmetric, one scale per output row (the vector-wise scheme of
  LLM.int8, Dettmers et al. 2022, without its outlier decomposition):
  ``w ≈ q * scale[row]``, ``q ∈ [-127, 127]``.
* ``int4``: symmetric, one scale per row and group of ``group_size`` inputs:
  ``w ≈ q * scale[row, col // group_size]``, ``q ∈ [-7, 7]``; two values per
  byte, column ``2j`` in the low nibble and ``2j+1`` in the high nibble, each a
  4-bit two's complement number. Scales are bfloat16 (half the bytes of
  float32: 0.47 of the 8B shape's 4.7 GB), and ``q`` is rounded against the
  bfloat16 scale, so the round-trip bound holds for the stored scale.
* ``fp8``: W8A8 in float8 e4m3 (Micikevicius et al. 2022, "FP8 Formats for
  Deep Learning"): the weight with one power-of-two scale per tensor, the
  input quantized at run time with one scale per call (its largest magnitude
  maps to 448), multiplied on float8 tensor cores (``torch._scaled_mm``; on
  CPU the same product in float32, where float8 values multiply exactly). Not
  weight-only: a whole-sequence step is bound by arithmetic (384+ rows), and
  float8 products run at twice bfloat16's rate on Hopper. Per tensor, not per
  row, because cuBLAS's per-tensor float8 product is 1.2-2.4x faster than the
  row-scaled one at a cached step's 32-64 rows (docs/decisions.md); e4m3 is a
  float, so one scale costs range, not precision. Power-of-two scales make
  fusing q/k/v (or gate/up) under one scale an exact exponent shift.
* ``w4a8``: int4 weights as in ``int4`` (the same values and scales), stored
  for integer tensor cores, and int8 activations with one scale per row
  (token), quantized at run time (W4A8 as in QServe, Lin et al. 2024, without
  its two-level scales). Why: a weight-only int4 product must turn every
  weight into a 16-bit float times its scale before a bfloat16 product, which
  kept the GPU kernel at 22-53 % of the memory bandwidth at a cached step's
  32-64 rows; int8 products take the nibbles with two bit operations per four
  bytes and apply each scale once per group (docs/decisions.md, session 6).
  Columns are reordered within chunks of 32 (:data:`W4A8_CHUNK`) and scales
  are stored transposed; see :class:`W4A8Linear`.
* optionally (``embedding=True``, int4 and w4a8, untied models) the token
  embedding too, row by row in the same int4 groups: it is looked up, never
  multiplied, so a lookup dequantizes only the rows it reads. On the LLaDA-8B
  shape the bfloat16 embedding is 1.04 GB, a fifth of the 5 GB W4 goal.

State-dict layout of a quantized ``nn.Linear`` (names unchanged, so LLaDA's
``model.transformer.blocks.{i}.q_proj...`` stay valid):

* ``weight``: int8 ``(out, in)`` or uint8 ``(out, in/2)`` (int4 packed);
* ``scales``: float32 ``(out,)`` (int8) or bfloat16 ``(out, in/group_size)``
  (int4; checkpoints written before held float32, which loads rounded);
  fp8: ``weight`` float8_e4m3fn ``(out, in)``, ``scales`` float32 ``(1,)``;
  w4a8: ``weight`` uint8 ``(out, in/2)`` in :data:`W4A8_CHUNK` column order,
  ``scales`` bfloat16 ``(in/group_size, out)``;
* ``bias``: float, only where the float model had one (Dream's q/k/v).

The group size is implied by the shapes and recorded in ``config.json``; a
quantized embedding is ``model.transformer.wte.weight`` (uint8 ``(V, d/2)``)
with ``wte.scales``, and ``modules`` reads ``all-linear+embedding``.

Kernels (figures in docs/decisions.md): on CUDA with 16-bit activations, the
Triton kernels of :mod:`ruvdllm.kernels.weight_only` read these layouts directly
and dequantize in registers (int4 picks, per shape, the fastest split of K or a
Triton dequantization followed by cuBLAS). On CPU, torch's packed kernels
(``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``) are 14-60x slower
than dequantize-then-matmul with float32 activations, but 2.4-3.7x faster with
bfloat16 activations. So bfloat16 inputs on CPU use them; everything else
dequantizes the weight to the activation dtype and calls ``F.linear``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal, Self, cast, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ruvdllm.checkpoint import load_model, resolve, save_checkpoint, tokenizer_file
from ruvdllm.config import ModelConfig
from ruvdllm.model import DiffusionLM

Scheme = Literal["int8", "int4", "fp8", "w4a8"]
SCHEMES: tuple[str, ...] = get_args(Scheme)
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 32  # chosen by held-out perplexity: docs/decisions.md
_INT8_MAX = 127
_INT4_MAX = 7
_TINY = torch.finfo(torch.float32).tiny  # scale of an all-zero row/group
INT4_SCALE_DTYPE = torch.bfloat16
MODULES = ("all-linear", "all-linear+embedding")


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """``(q int8 (out, in), scales float32 (out,))`` with ``w ≈ q * scales[:, None]``."""
    w = w.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=_TINY) / _INT8_MAX  # (out,)
    q = torch.round(w / scales[:, None]).clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return q, scales


def dequantize_int8(q: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return q.to(dtype) * scales.to(dtype)[:, None]  # (out, in)


# Clipping ratios tried per group: with 4 bits, clipping the largest weights of a
# group often lowers its total squared error (the clip search of AWQ, Lin et al. 2024).
_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def quantize_int4(w: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """``(packed uint8 (out, in/2), scales bfloat16 (out, in/group_size))``.

    Each group's scale is the clipping ratio of ``_CLIP_RATIOS`` with the least
    squared reconstruction error, rounded to bfloat16 before ``q`` is computed.
    """
    out_f, in_f = w.shape
    wg = w.detach().float().reshape(out_f, in_f // group_size, group_size)  # (out, G, g)
    absmax = wg.abs().amax(dim=-1).clamp(min=_TINY)  # (out, G)
    best_err = torch.full_like(absmax, torch.inf)
    scales = absmax / _INT4_MAX
    tiny = torch.finfo(INT4_SCALE_DTYPE).tiny  # an all-zero group's scale stays nonzero
    for ratio in _CLIP_RATIOS:
        cand = (absmax * ratio / _INT4_MAX).to(INT4_SCALE_DTYPE).float().clamp(min=tiny)
        rec = torch.round(wg / cand[..., None]).clamp(-_INT4_MAX, _INT4_MAX) * cand[..., None]
        err = (rec - wg).pow(2).sum(-1)  # (out, G)
        better = err < best_err
        scales = torch.where(better, cand, scales)
        best_err = torch.where(better, err, best_err)
    q = torch.round(wg / scales[..., None]).clamp(-_INT4_MAX, _INT4_MAX).to(torch.int8)
    return pack_int4(q.reshape(out_f, in_f)), scales.to(INT4_SCALE_DTYPE)


def pack_int4(q: Tensor) -> Tensor:
    """uint8 ``(out, in/2)`` of int8 values ``(out, in)`` in [-8, 7]: column ``2j`` in the
    low nibble of byte ``j``, ``2j+1`` in the high one."""
    packed = (q[:, 0::2] & 0x0F) | (q[:, 1::2] << 4)  # (out, in/2), int8 bit patterns
    return packed.view(torch.uint8)


def unpack_int4(packed: Tensor, dtype: torch.dtype = torch.int8) -> Tensor:
    """Signed values ``(out, in)`` of a packed ``(out, in/2)`` uint8 tensor, as ``dtype``.

    Strided copies into one buffer: 3x faster on CPU than ``torch.stack`` of int8.
    """
    p = packed.view(torch.int8)
    q = torch.empty(*p.shape, 2, dtype=dtype, device=p.device)  # (out, in/2, 2)
    q[..., 0] = (p << 4) >> 4  # low nibble; arithmetic shifts sign-extend
    q[..., 1] = p >> 4
    return q.flatten(1)  # (out, in)


def dequantize_int4(packed: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    out_f, n_groups = scales.shape
    q = unpack_int4(packed, dtype).view(out_f, n_groups, -1)  # (out, G, g)
    return q.mul_(scales.to(dtype)[..., None]).view(out_f, -1)  # (out, in)


def _use_cpu_kernel(x: Tensor) -> bool:
    """Packed CPU kernels pay off for bfloat16 activations only (see module doc).

    They have no autograd formula, so inputs that need a gradient (LoRA
    training through a quantized base) take the dequantize path.
    """
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and not x.requires_grad


def _use_gpu_kernel(x: Tensor) -> bool:
    """The Triton kernels of :mod:`ruvdllm.kernels.weight_only` serve 16-bit CUDA inputs.

    float32 inputs (the correctness reference) and inputs that need a gradient
    take the dequantize path.
    """
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and not x.requires_grad


class QuantizedLinear(nn.Module):
    """Common part of the quantized linears: buffers, optional float bias, repr.

    ``forward(x)`` is a plain function of ``x`` with ``in_features`` and
    ``out_features`` like ``nn.Linear``, so LoRA can wrap it unchanged.
    """

    weight: Tensor
    scales: Tensor

    def __init__(self, in_features: int, out_features: int, weight: Tensor, scales: Tensor,
                 bias: nn.Parameter | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.bias = bias

    def _add_bias(self, y: Tensor) -> Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @staticmethod
    def concatenate(parts: list[QuantizedLinear]) -> tuple[Tensor, Tensor]:
        """Weight and scales of ``parts`` stacked by output rows (one fused product)."""
        return torch.cat([p.weight for p in parts]), torch.cat([p.scales for p in parts])

    def rows_scales(self, lo: int, hi: int) -> Tensor:
        """The scales of output rows ``lo:hi`` (a part of a fused product)."""
        return self.scales[lo:hi]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class _UnpackedLinear(QuantizedLinear):
    """A quantized linear storing one element per weight (int8, float8) and float32 scales,
    one per output row or one for the tensor."""

    STORAGE: ClassVar[torch.dtype]
    SCALE_PER_ROW: ClassVar[bool]

    @staticmethod
    def quantize(w: Tensor) -> tuple[Tensor, Tensor]:
        """``(q, scales)`` of a float weight ``(out, in)``."""
        raise NotImplementedError

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Self:
        q, scales = cls.quantize(linear.weight)
        return cls(linear.in_features, linear.out_features, q, scales, linear.bias)

    @classmethod
    def empty_like(cls, linear: nn.Linear) -> Self:
        """Correctly shaped buffers on ``linear``'s device, to be loaded into."""
        out_f, dev = linear.out_features, linear.weight.device
        return cls(linear.in_features, out_f,
                   torch.empty(out_f, linear.in_features, dtype=cls.STORAGE, device=dev),
                   torch.empty(out_f if cls.SCALE_PER_ROW else 1, device=dev), linear.bias)


class Int8Linear(_UnpackedLinear):
    """``y = x Wᵀ (+ b)`` with an int8 weight and one scale per output row."""

    STORAGE, SCALE_PER_ROW = torch.int8, True
    quantize = staticmethod(quantize_int8)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_int8(self.weight, self.scales, dtype)

    def forward(self, x: Tensor) -> Tensor:
        if _use_gpu_kernel(x):
            from ruvdllm.kernels.weight_only import int8_matmul  # Triton: CUDA only

            y = int8_matmul(x.reshape(-1, self.in_features), self.weight, self.scales)
            return self._add_bias(y.reshape(*x.shape[:-1], self.out_features))
        scales = self.scales.to(x.dtype)
        if _use_cpu_kernel(x):
            x2 = x.reshape(-1, self.in_features).contiguous()  # (tokens, in): 2-D only
            y = torch._weight_int8pack_mm(x2, self.weight, scales)
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:  # the per-row scale commutes with the matmul: scale the output
            y = F.linear(x, self.weight.to(x.dtype)) * scales
        return self._add_bias(y)


def _groups(in_features: int, group_size: int) -> int:
    if in_features % group_size:
        raise ValueError(f"int4 group size {group_size} does not divide in_features "
                         f"{in_features}")
    return in_features // group_size


class Int4Linear(QuantizedLinear):
    """``y = x Wᵀ (+ b)`` with a packed int4 weight and group-wise scales.

    For the CPU kernel the weight is repacked into torch's layout on first use
    with a given dtype; that copy is derived (never a buffer, never saved) and is
    dropped on every state-dict load and ``.to()``/``_apply``. Writing into the
    buffers in place by other means is not supported.
    """

    def __init__(self, in_features: int, out_features: int, weight: Tensor, scales: Tensor,
                 bias: nn.Parameter | None) -> None:
        super().__init__(in_features, out_features, weight, scales, bias)
        self.group_size = in_features // scales.shape[1]
        # (dtype, torch's (out, in/2) uint8 layout, (G, out, 2) scale and zero table)
        self._kernel: tuple[torch.dtype, Tensor, Tensor] | None = None

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Int4Linear:
        self._kernel = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._kernel = None
        super()._load_from_state_dict(*args, **kwargs)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        _groups(linear.in_features, group_size)
        packed, scales = quantize_int4(linear.weight, group_size)
        return cls(linear.in_features, linear.out_features, packed, scales, linear.bias)

    @classmethod
    def empty_like(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        """Correctly shaped buffers on ``linear``'s device, to be loaded into."""
        out_f, in_f, dev = linear.out_features, linear.in_features, linear.weight.device
        return cls(in_f, out_f, torch.empty(out_f, in_f // 2, dtype=torch.uint8, device=dev),
                   torch.empty(out_f, _groups(in_f, group_size), dtype=INT4_SCALE_DTYPE,
                               device=dev), linear.bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_int4(self.weight, self.scales, dtype)

    def _cpu_kernel_weight(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """torch's int4 CPU layout and its scale/zero table (zero = 0: symmetric)."""
        if self._kernel is None or self._kernel[0] != dtype:
            unsigned = (unpack_int4(self.weight, torch.int32) + 8)  # (out, in), 1..15
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 2)
            scales_t = self.scales.t().to(dtype)  # (G, out)
            table = torch.stack((scales_t, torch.zeros_like(scales_t)), dim=-1)  # (G, out, 2)
            self._kernel = (dtype, packed, table.contiguous())
        return self._kernel[1], self._kernel[2]

    def forward(self, x: Tensor) -> Tensor:
        if _use_gpu_kernel(x):  # it also picks dequantize + cuBLAS where that is faster
            from ruvdllm.kernels.weight_only import int4_matmul  # Triton: CUDA only

            y = int4_matmul(x.reshape(-1, self.in_features), self.weight, self.scales)
            y = y.reshape(*x.shape[:-1], self.out_features)
        elif _use_cpu_kernel(x) and self.out_features % 16 == 0:  # the kernel's constraint
            packed, table = self._cpu_kernel_weight(x.dtype)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.reshape(-1, self.in_features).contiguous(), packed, self.group_size, table)
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dequantize(x.dtype))
        return self._add_bias(y)


FP8_MAX = 448.0  # the largest finite float8_e4m3fn
# The smallest row maximum a per-row activation scale (int8 or float8) is taken from:
# 127 / ACT_FLOOR and 448 / ACT_FLOOR are finite, so an all-zero row quantizes to zeros
# (float32's _TINY would give 0 * inf).
ACT_FLOOR = 1e-30
# From this many rows (16-bit inputs on CUDA) a float8 product's input has one scale per
# row, quantized by the kernel that writes it (:meth:`Fp8Linear.takes_rows`), and the
# product is CUTLASS's row-scaled one. At 512 rows it is as fast as cuBLAS's per-tensor
# one (a layer's four 8B products 166.8 against 166.0 us; 3 072 rows: 975 against 964),
# and it needs no maximum over the tensor: no reduction and no quantization kernel. At
# 256 rows it is 21 % slower (118.6 against 97.8 us), at 32-64 rows 1.2-2.4x
# (`python3 -m bench.gpu_probe scaled-mm`, H200; docs/decisions.md, session 9).
FP8_ROWS = 512


def quantize_fp8(w: Tensor) -> tuple[Tensor, Tensor]:
    """``(q float8_e4m3fn (out, in), scale float32 (1,))`` with ``w ≈ q * scale``.

    The scale is the power of two that puts the largest magnitude in
    ``(224, 448]``: one binade of range given up so that rescaling by another
    power of two (:meth:`Fp8Linear.concatenate`) is exact.
    """
    w = w.detach().float()
    amax = w.abs().amax().clamp(min=_TINY)
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX))).reshape(1)
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def quantize_fp8_activations(x: Tensor, amax: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(q float8_e4m3fn, scale float32 ())`` of ``x`` with one scale, ``max |x| -> 448``.

    ``amax``: partial maxima of ``|x|`` (any 1-D split), if the producer of ``x`` has them.
    """
    if x.is_cuda:
        from ruvdllm.kernels.fp8 import quantize_tensor  # Triton: CUDA only

        return quantize_tensor(x.contiguous(), _TINY, amax)
    peak = x.detach().abs().amax() if amax is None else amax.amax()
    scale = peak.float().clamp(min=_TINY) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def quantize_fp8_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(q float8_e4m3fn (M, K), scale float32 (M,))`` with ``x[m] ≈ q[m] * scale[m]``:
    one scale per row, ``max |x[m]| -> 448``. On CUDA one Triton kernel, bit-identical to
    this torch code (:mod:`ruvdllm.kernels.rowquant`)."""
    if x.is_cuda:
        from ruvdllm.kernels.rowquant import quantize_rows  # Triton: CUDA only

        return quantize_rows(x.contiguous(), fp8=True)
    scale = x.detach().float().abs().amax(dim=-1).clamp(min=ACT_FLOOR) / FP8_MAX  # (M,)
    inv = torch.ones_like(scale) / scale  # IEEE division, as the kernel's; then products
    q = (x.float() * inv[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def _fp8_on_tensor_cores(x: Tensor, K: int, N: int) -> bool:
    # cuBLAS and CUTLASS need dimensions in multiples of 16; on the CPU the product runs
    # in float32 (float8 values and their products are exact there): torch's CPU float8
    # product measured 190x slower (256 x 384 x 1 024: 7.35 s against 0.039 s)
    return x.is_cuda and K % 16 == 0 and N % 16 == 0


def fp8_matmul(x: Tensor, weight: Tensor, scale: Tensor, amax: Tensor | None = None) -> Tensor:
    """``x`` ``(M, K)`` quantized to float8 with one scale, times the float8 weight
    ``(N, K)`` transposed.

    ``scale`` ``(1,)`` is the weight's; the result ``(M, N)`` has x's dtype.
    ``amax``: as for :func:`quantize_fp8_activations`.
    """
    N = weight.shape[0]
    q, x_scale = quantize_fp8_activations(x, amax)
    if not _fp8_on_tensor_cores(x, x.shape[1], N):
        y = (q.float() * x_scale) @ (weight.float() * scale).t()
    else:
        y = torch._scaled_mm(q, weight.t(), scale_a=x_scale, scale_b=scale[0],
                             out_dtype=x.dtype, use_fast_accum=True)
    return y.to(x.dtype)


def fp8_rows_matmul(q: Tensor, x_scale: Tensor, weight: Tensor, scale_row: Tensor,
                    dtype: torch.dtype) -> Tensor:
    """``(q * x_scale[:, None]) (weight * scale_row.t())ᵀ`` as ``(M, N)`` of ``dtype``: float8
    rows ``q`` ``(M, K)`` with their scales ``(M,)`` (:func:`quantize_fp8_rows`, or the
    kernel that wrote them), and the weight's scale as a contiguous ``(1, N)`` row
    (:meth:`Fp8Linear.scale_row`); on CUDA CUTLASS's row-scaled product (bfloat16 output
    only)."""
    M, N = q.shape[0], weight.shape[0]
    if not _fp8_on_tensor_cores(q, q.shape[1], N) or dtype != torch.bfloat16:
        w = weight.float() * scale_row.t()  # (N, K)
        return ((q.float() * x_scale[:, None]) @ w.t()).to(dtype)
    return torch._scaled_mm(q, weight.t(), scale_a=x_scale.view(M, 1), scale_b=scale_row,
                            out_dtype=dtype, use_fast_accum=True)


class Fp8Linear(_UnpackedLinear):
    """``y = x Wᵀ (+ b)`` with a float8 weight and float8 activations (W8A8): one scale
    for the weight, and one for the input tensor, or one per input row from
    :data:`FP8_ROWS` rows on CUDA (:meth:`takes_rows`).

    Inputs that need a gradient (LoRA training through a quantized base) are
    multiplied with the dequantized weight in their own dtype: the activation
    quantization has no gradient.
    """

    STORAGE, SCALE_PER_ROW = torch.float8_e4m3fn, False
    quantize = staticmethod(quantize_fp8)
    _row_key: tuple[int, int, torch.device] | None = None  # scale_row's cache
    _row: Tensor

    @staticmethod
    def concatenate(parts: list[QuantizedLinear]) -> tuple[Tensor, Tensor]:
        """One weight and scale for ``parts`` stacked by rows: the largest scale, each
        part's values shifted by the (power-of-two) ratio of its scale to it."""
        scale = torch.stack([p.scales for p in parts]).amax(0)  # (1,)
        weight = torch.cat([(p.weight.float() * (p.scales / scale)).to(torch.float8_e4m3fn)
                            for p in parts])
        return weight, scale

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Fp8Linear:
        """``.to(dtype)`` casts every float buffer; the stored format keeps its dtypes."""
        stored = {id(self.weight), id(self.scales)}

        def keep_dtype(t: Tensor) -> Tensor:
            y = fn(t)
            return t.to(y.device) if id(t) in stored and y.dtype != t.dtype else y

        return cast(Fp8Linear, super()._apply(keep_dtype, recurse))

    def rows_scales(self, lo: int, hi: int) -> Tensor:
        return self.scales  # one scale for every row

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return (self.weight.float() * self.scales).to(dtype)  # (out, in)

    def forward(self, x: Tensor, amax: Tensor | None = None) -> Tensor:
        """``amax``: partial maxima of ``|x|`` from the kernel that produced ``x``, if any
        (one scale per tensor; from :data:`FP8_ROWS` rows ``x`` is quantized per row)."""
        if x.requires_grad:
            return self._add_bias(F.linear(x, self.dequantize(x.dtype)))
        x2 = x.reshape(-1, self.in_features)  # (tokens, in)
        if self.takes_rows(x):
            return self.forward_rows(*quantize_fp8_rows(x2), x.shape[:-1], x.dtype)
        y = fp8_matmul(x2, self.weight, self.scales, amax)
        return self._add_bias(y.reshape(*x.shape[:-1], self.out_features))

    def scale_row(self) -> Tensor:
        """The weight's scale as a contiguous ``(1, out)`` row, the row-scaled product's
        operand; kept until ``scales`` changes (in place or replaced): made per product,
        it was a copy kernel each (docs/decisions.md, session 9)."""
        key = (self.scales.data_ptr(), self.scales._version, self.scales.device)
        if self._row_key != key:
            self._row = self.scales.expand(1, self.out_features).contiguous()
            self._row_key = key
        return self._row

    def takes_rows(self, x: Tensor) -> bool:
        """Whether the product of ``x`` (not yet computed: its shape, dtype and device)
        quantizes it per row (:data:`FP8_ROWS`), so that the kernel writing it can."""
        return (x.is_cuda and x.dtype == torch.bfloat16 and not x.requires_grad
                and x.numel() // x.shape[-1] >= FP8_ROWS
                and _fp8_on_tensor_cores(x, self.in_features, self.out_features))

    def forward_rows(self, q: Tensor, scale: Tensor, lead: tuple[int, ...] | torch.Size,
                     dtype: torch.dtype) -> Tensor:
        """The product of an input that its producer quantized per row (``q`` float8
        ``(tokens, in)``, ``scale`` float32 ``(tokens,)``, as :func:`quantize_fp8_rows`);
        output ``(*lead, out)`` of ``dtype``."""
        y = fp8_rows_matmul(q, scale, self.weight, self.scale_row(), dtype)
        return self._add_bias(y.reshape(*lead, self.out_features))


# W4A8's column order inside each chunk of 32 (one int8 tensor-core step): byte j of a
# chunk's 16 holds columns j (low nibble) and 16 + j (high nibble), so the kernel's two
# bit operations on 4 bytes give two registers of 4 consecutive columns each, the
# register layout of the tensor-core operand (kernels/w4a8.py).
W4A8_CHUNK = 32
_W4A8_ORDER = torch.arange(W4A8_CHUNK).view(2, W4A8_CHUNK // 2).t().reshape(-1)  # 0, 16, 1, ...


def _w4a8_columns(in_features: int) -> Tensor:
    """Column of the int4 layout's position ``i`` in W4A8's layout, for every ``i``."""
    if in_features % W4A8_CHUNK:
        raise ValueError(f"w4a8 needs in_features in multiples of {W4A8_CHUNK}, "
                         f"got {in_features}")
    chunks = torch.arange(0, in_features, W4A8_CHUNK)[:, None]  # (in / 32, 1)
    return (chunks + _W4A8_ORDER).reshape(-1)  # (in,)


def quantize_activations_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(q int8 (M, K), scale float32 (M,))`` with ``x[m] ≈ q[m] * scale[m]``.

    One symmetric scale per row (token): ``peak = max |x[m]|``, ``scale = peak /
    127``, ``q = round(x * (127 / peak))`` (ties to even; one reciprocal per row).
    On CUDA one Triton kernel, bit-identical to this torch code.
    """
    if x.is_cuda:
        from ruvdllm.kernels.rowquant import quantize_rows  # Triton: CUDA only

        return quantize_rows(x.contiguous())
    peak = x.detach().float().abs().amax(dim=-1).clamp(min=ACT_FLOOR)  # (M,)
    # tensor / tensor: IEEE division, as the kernel's (``127 / peak`` would be torch's
    # reciprocal-then-multiply, which differs in the last bit for a quarter of values)
    inv = torch.full_like(peak, _INT8_MAX) / peak  # (M,)
    q = torch.round(x.float() * inv[:, None]).to(torch.int8)
    return q, peak / _INT8_MAX


class W4A8Linear(QuantizedLinear):
    """``y = x Wᵀ (+ b)`` with int4 weights (group scales) and int8 activations (row scales).

    The weight values and scales are :func:`quantize_int4`'s, stored for the
    integer tensor cores: columns in :data:`W4A8_CHUNK` order within each chunk,
    and scales transposed, ``(in/group_size, out)`` bfloat16, so one group's
    scales of a tile of output rows are contiguous. The input is quantized per
    row at run time (:func:`quantize_activations_int8`). On CUDA with 16-bit
    inputs the Triton kernel of :mod:`ruvdllm.kernels.w4a8` runs; elsewhere the
    same product in float32. Inputs that need a gradient (LoRA training) are
    multiplied with the dequantized weight in their own dtype.
    """

    def __init__(self, in_features: int, out_features: int, weight: Tensor, scales: Tensor,
                 bias: nn.Parameter | None) -> None:
        super().__init__(in_features, out_features, weight, scales, bias)
        self.group_size = in_features // scales.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> W4A8Linear:
        columns = _w4a8_columns(linear.in_features)
        _groups(linear.in_features, group_size)
        packed, scales = quantize_int4(linear.weight, group_size)
        q = unpack_int4(packed)[:, columns.to(packed.device)]  # (out, in) in W4A8 order
        return cls(linear.in_features, linear.out_features, pack_int4(q),
                   scales.t().contiguous(), linear.bias)

    @classmethod
    def empty_like(cls, linear: nn.Linear, group_size: int) -> W4A8Linear:
        """Correctly shaped buffers on ``linear``'s device, to be loaded into."""
        out_f, in_f, dev = linear.out_features, linear.in_features, linear.weight.device
        _w4a8_columns(in_f)
        return cls(in_f, out_f, torch.empty(out_f, in_f // 2, dtype=torch.uint8, device=dev),
                   torch.empty(_groups(in_f, group_size), out_f, dtype=INT4_SCALE_DTYPE,
                               device=dev), linear.bias)

    @staticmethod
    def concatenate(parts: list[QuantizedLinear]) -> tuple[Tensor, Tensor]:
        return torch.cat([p.weight for p in parts]), torch.cat([p.scales for p in parts], 1)

    def rows_scales(self, lo: int, hi: int) -> Tensor:
        return self.scales[:, lo:hi]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        q = torch.empty(self.out_features, self.in_features, dtype=dtype,
                        device=self.weight.device)
        q[:, _w4a8_columns(self.in_features).to(q.device)] = unpack_int4(self.weight, dtype)
        groups = q.view(self.out_features, -1, self.group_size)  # (out, G, g)
        return groups.mul_(self.scales.t().to(dtype)[..., None]).view_as(q)  # (out, in)

    def forward(self, x: Tensor, partials: bool = False) -> Tensor:
        if x.requires_grad:
            return self._add_bias(F.linear(x, self.dequantize(x.dtype)))
        q, scale = quantize_activations_int8(x.reshape(-1, self.in_features))
        return self.forward_rows(q, scale, x.shape[:-1], x.dtype, partials)

    def forward_rows(self, q: Tensor, scale: Tensor, lead: tuple[int, ...] | torch.Size,
                     dtype: torch.dtype, partials: bool = False) -> Tensor:
        """The product of an input the kernel that wrote it has already quantized
        (``q`` int8 ``(tokens, in)``, ``scale`` float32 ``(tokens,)``, as
        :func:`quantize_activations_int8`); output ``(*lead, out)`` of ``dtype``.

        With ``partials`` (for a reader that sums them: the fused residual norm) the
        GPU kernel may return ``(S, *lead, out)``, the terms of a split K whose sum is
        the output (:func:`ruvdllm.kernels.w4a8.w4a8_matmul`); not with a bias.
        """
        if q.is_cuda and dtype in (torch.bfloat16, torch.float16):
            from ruvdllm.kernels.w4a8 import w4a8_matmul  # Triton: CUDA only

            terms = partials and self.bias is None
            y = w4a8_matmul(q, scale, self.weight, self.scales, dtype, partials=terms)
            if terms:
                return y.view(y.shape[0], *lead, self.out_features)  # (S, *lead, out)
        else:  # int8 and int4 values and their products are exact in float32
            y = ((q.float() * scale[:, None]) @ self.dequantize().t()).to(dtype)
        return self._add_bias(y.reshape(*lead, self.out_features))


class Int4Embedding(nn.Module):
    """A token embedding stored as int4 rows (the layout of :class:`Int4Linear`'s weight).

    ``forward(ids)`` dequantizes only the looked-up rows, to ``dtype``: the
    float embedding's dtype, kept through ``.to()``.
    """

    weight: Tensor
    scales: Tensor

    def __init__(self, weight: Tensor, scales: Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("weight", weight)  # (V, d/2) uint8
        self.register_buffer("scales", scales)  # (V, d/group)
        self.num_embeddings, self.embedding_dim = weight.shape[0], weight.shape[1] * 2
        self.dtype = dtype

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, group_size: int) -> Int4Embedding:
        _groups(emb.embedding_dim, group_size)
        packed, scales = quantize_int4(emb.weight, group_size)
        return cls(packed, scales, emb.weight.dtype)

    @classmethod
    def empty_like(cls, emb: nn.Embedding, group_size: int) -> Int4Embedding:
        V, d, dev = emb.num_embeddings, emb.embedding_dim, emb.weight.device
        return cls(torch.empty(V, d // 2, dtype=torch.uint8, device=dev),
                   torch.empty(V, _groups(d, group_size), dtype=INT4_SCALE_DTYPE, device=dev),
                   emb.weight.dtype)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Int4Embedding:
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype  # follows .to(dtype)
        return super()._apply(fn, recurse)

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)  # (n,)
        rows = dequantize_int4(self.weight.index_select(0, flat),
                               self.scales.index_select(0, flat), self.dtype)  # (n, d)
        return rows.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int4"


def _factory(scheme: str, group_size: int | None,
             empty: bool) -> Callable[[nn.Linear], QuantizedLinear]:
    """How to build the quantized twin of a linear; refuses bad scheme / group size."""
    if scheme == "int8":
        return Int8Linear.empty_like if empty else Int8Linear.from_linear
    if scheme == "fp8":
        return Fp8Linear.empty_like if empty else Fp8Linear.from_linear
    if scheme not in ("int4", "w4a8"):
        raise ValueError(f"unknown quantization scheme {scheme!r}; expected one of {SCHEMES}")
    if not isinstance(group_size, int) or group_size not in GROUP_SIZES:
        raise ValueError(f"{scheme} group size must be one of {GROUP_SIZES}, "
                         f"got {group_size!r}")
    kind = Int4Linear if scheme == "int4" else W4A8Linear
    return partial(kind.empty_like if empty else kind.from_linear, group_size=group_size)


def _swap(model: DiffusionLM, make: Callable[[nn.Linear], QuantizedLinear]) -> None:
    """Replace every ``nn.Linear``; all are built first, so an error changes nothing."""
    linears = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    if not linears:
        raise ValueError("model has no float linear layers to quantize")
    built = [make(lin) for _, _, lin in linears]
    for (parent, name, _), new in zip(linears, built, strict=True):
        setattr(parent, name, new)


def _check_embedding(model: DiffusionLM, scheme: object) -> None:
    if scheme not in ("int4", "w4a8"):
        raise ValueError("only int4 and w4a8 quantize the embedding (as int4 rows)")
    if model.config.weight_tying:
        raise ValueError("a tied embedding is the LM head's weight; quantize it as a linear "
                         "or not at all")


def quantize_model(model: DiffusionLM, scheme: Scheme, group_size: int = DEFAULT_GROUP_SIZE,
                   embedding: bool = False) -> DiffusionLM:
    """Quantize every ``nn.Linear`` of a float model in place, and the embedding if asked.

    Records ``{"scheme", "group_size", "modules"}`` in ``model.config.quantization``
    (``group_size`` is null for int8 and fp8, which have none; ``modules`` is
    ``all-linear`` or ``all-linear+embedding``).
    """
    if model.config.quantization:
        raise ValueError(f"model is already quantized ({model.config.quantization})")
    make = _factory(scheme, group_size, empty=False)
    if embedding:
        _check_embedding(model, scheme)
    with torch.no_grad():
        _swap(model, make)
        if embedding:
            setattr(model.transformer, "wte",  # noqa: B010 (wte is typed nn.Embedding)
                    Int4Embedding.from_embedding(model.transformer.wte, group_size))
    gs = group_size if scheme in ("int4", "w4a8") else None
    model.config.quantization = {"scheme": scheme, "group_size": gs,
                                 "modules": MODULES[int(embedding)]}
    return model


def prepare_quantized(model: DiffusionLM, quantization: dict[str, object]) -> None:
    """Give a freshly built (e.g. meta) model the modules of a quantized checkpoint.

    Called by :func:`ruvdllm.checkpoint.load_model` before ``load_state_dict``;
    ``quantization`` comes from config.json, so it is validated here.
    """
    scheme, group_size = quantization.get("scheme"), quantization.get("group_size")
    modules = quantization.get("modules")
    if modules not in MODULES:
        raise ValueError(f"quantization: unsupported modules {modules!r}; expected one of "
                         f"{MODULES}")
    if not isinstance(scheme, str) or not (group_size is None or isinstance(group_size, int)):
        raise ValueError(f"quantization: malformed entry {quantization}")
    _swap(model, _factory(scheme, group_size, empty=True))
    if modules == "all-linear+embedding":
        _check_embedding(model, scheme)  # int4 or w4a8: _factory has checked group_size
        setattr(model.transformer, "wte",  # noqa: B010 (wte is typed nn.Embedding)
                Int4Embedding.empty_like(model.transformer.wte, cast(int, group_size)))


def quantize_checkpoint(src: str | Path, dst: str | Path, scheme: Scheme,
                        group_size: int = DEFAULT_GROUP_SIZE) -> Path:
    """Quantize the float checkpoint ``src`` (folder or embedded name) into folder ``dst``."""
    _factory(scheme, group_size, empty=False)  # refuse bad arguments before loading
    model = load_model(src)
    if model.config.quantization:
        raise ValueError(f"{src} is stored quantized ({model.config.quantization['scheme']}); "
                         "quantize a float checkpoint")
    quantize_model(model, scheme, group_size)
    tokenizer = tokenizer_file(resolve(src))
    return save_checkpoint(model, dst, tokenizer_file=tokenizer if tokenizer.exists() else None)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (what a checkpoint stores)."""
    return sum(t.numel() * t.element_size()
               for t in [*model.parameters(), *model.buffers()])


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):  # warm-up (also builds the int4 kernel layout)
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def bench(tokens: int, batch: int, repeats: int, dtype: torch.dtype, seed: int) -> list[str]:
    """Forward time, weight bytes and logits error of float / int8 / int4 models.

    Rounds alternate between the models, so drift in the machine's load hits
    all of them alike.
    """
    torch.manual_seed(seed)
    base = DiffusionLM(ModelConfig()).eval()
    ids = torch.randint(0, base.config.vocab_size, (batch, tokens))
    models = {"float": base, "int8": quantize_model(copy.deepcopy(base), "int8")}
    for g in GROUP_SIZES:
        models[f"int4 g{g}"] = quantize_model(copy.deepcopy(base), "int4", g)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        logits = {name: m.to(dtype)(ids).logits.float() for name, m in models.items()}
        for _ in range(repeats + 2):  # the first two rounds are warm-up
            for name, m in models.items():
                start = time.perf_counter()
                m(ids)
                times[name].append(time.perf_counter() - start)
    ref_ms = statistics.median(times["float"][2:]) * 1e3
    ref_bytes, ref_logits = weight_bytes(base), logits["float"]
    rows = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, {dtype}, "
            f"batch {batch} x {tokens} tokens, median of {repeats}, "
            f"{base.num_parameters() / 1e6:.1f}M parameters",
            "| model | ms/forward | x float | weight MB | x float | logits rel. err |",
            "|---|---|---|---|---|---|"]
    for name, m in models.items():
        ms = statistics.median(times[name][2:]) * 1e3
        nbytes = weight_bytes(m)
        err = ((logits[name] - ref_logits).norm() / ref_logits.norm()).item()
        rows.append(f"| {name} | {ms:.1f} | {ms / ref_ms:.2f} | {nbytes / 1e6:.2f} | "
                    f"{nbytes / ref_bytes:.3f} | {err:.4f} |")
    return rows


def _kernel_candidates(x: Tensor, lin: nn.Linear, q8: Int8Linear,
                       q4: Int4Linear) -> list[Callable[[], object]]:
    """Float matmul, then int8 and int4 each as dequantize-then-matmul and packed kernel."""
    scales = q8.scales.to(x.dtype)
    packed, table = q4._cpu_kernel_weight(x.dtype)
    return [
        lambda: lin(x),
        lambda: F.linear(x, q8.weight.to(x.dtype)) * scales,
        lambda: torch._weight_int8pack_mm(x, q8.weight, scales),
        lambda: F.linear(x, q4.dequantize(x.dtype)),
        lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, q4.group_size, table),
    ]


def bench_kernels(repeats: int, seed: int) -> list[str]:
    """Per-shape time (ms) of the candidate implementations of one quantized linear."""
    torch.manual_seed(seed)
    rows = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, int4 group "
            f"{DEFAULT_GROUP_SIZE}, median of {repeats}, ms per call",
            "| dtype | out x in | tokens | float | int8 dequant | int8 kernel | "
            "int4 dequant | int4 kernel |", "|---|---|---|---|---|---|---|---|"]
    for dtype in (torch.float32, torch.bfloat16):
        for out_f, in_f in ((1024, 384), (384, 1024), (8192, 384)):
            lin = nn.Linear(in_f, out_f, bias=False).to(dtype)
            q8 = Int8Linear.from_linear(lin)
            q4 = Int4Linear.from_linear(lin, DEFAULT_GROUP_SIZE)
            for m in (64, 128, 512):
                x = torch.randn(m, in_f, dtype=dtype)
                with torch.inference_mode():
                    ms = [_median_ms(fn, repeats) for fn in _kernel_candidates(x, lin, q8, q4)]
                rows.append(f"| {str(dtype).removeprefix('torch.')} | {out_f} x {in_f} | {m} | "
                            + " | ".join(f"{t:.2f}" for t in ms) + " |")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ruvdllm.quant",
                                     description="Benchmarks of weight-only quantization.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_bench = sub.add_parser("bench", help="whole-model forward: float vs int8 vs int4")
    p_bench.add_argument("--tokens", type=int, default=128)
    p_bench.add_argument("--batch", type=int, default=1)
    p_bench.add_argument("--repeats", type=int, default=20)
    p_bench.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p_kern = sub.add_parser("kernels", help="per-linear times of the kernel candidates (ms)")
    p_kern.add_argument("--repeats", type=int, default=10)
    for p in (p_bench, p_kern):
        p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "bench":
        if min(args.tokens, args.batch, args.repeats) < 1:
            parser.error("--tokens, --batch and --repeats must be positive")
        rows = bench(args.tokens, args.batch, args.repeats, getattr(torch, args.dtype), args.seed)
    else:
        if args.repeats < 1:
            parser.error("--repeats must be positive")
        rows = bench_kernels(args.repeats, args.seed)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
