"""W4A8 products for few rows in CUDA C++: warp-level integer tensor-core instructions
fed from a cp.async pipeline (``w4a8_mma.cu``, compiled at run time by NVRTC).

Why a second kernel beside the Triton one (:mod:`ruvdllm.kernels.w4a8`): at the
16-64 rows of a cached denoising step the product is a stream of int4 weights, and
Triton's Hopper path ends every group's ``wgmma`` with ``wgmma.wait_group 0`` (the
decoded weights are a register operand), so each group waits for the tensor core
before the next one's weights are decoded; it held those products at 2-2.7 TB/s
(docs/decisions.md, session 8). ``mma.sync`` is synchronous only through its
registers: the compiler interleaves one k32 step's decoding and shared-memory reads
with the previous step's products, and the int32-to-float scaling of a group with the
next group's products. The weight format is the Triton kernel's
(:class:`ruvdllm.quant.W4A8Linear`): its chunk order is already ``mma.sync``'s A
fragment, so one ``ldmatrix`` gives a thread the bytes of two k32 steps' fragments,
two bit operations a word decode them, and one weight copy serves both kernels.

NVRTC comes with PyTorch's CUDA builds, and ``torch.cuda._compile_kernel`` (PyTorch
2.8+) compiles a source with it and launches through the driver on the current stream,
so no compiler, extension build or binary ships with the package. Each configuration
is compiled once per process (about a second). Where that fails (no NVRTC, no CUDA
headers), :func:`available` is False and the Triton kernel runs.
"""

from __future__ import annotations

import warnings
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ruvdllm.kernels.weight_only import split_k_output

SOURCE = Path(__file__).with_name("w4a8_mma.cu")
STAGE_K = 256  # K per pipeline stage (128 bytes of each weight row)
PROBE = 0  # bench/mma_variants.py: 1 contiguous weight blocks, 2 no products, 4 no int8 rows
_OUT = {torch.bfloat16: 0, torch.float16: 1}  # 2: float32 terms, 3: float32 atomics


class MmaConfig(NamedTuple):
    """A program: ``32 * warps_n`` weight rows by ``8 * n_tiles`` tokens, its stage's K
    split over ``warps_k`` warps; ``stages`` in flight; K split over ``split_k`` programs."""

    warps_n: int
    warps_k: int
    n_tiles: int
    stages: int
    split_k: int

    def shared_bytes(self, group: int) -> int:
        """The pipeline's stages, or the K warps' sums at the end if more."""
        rows = 32 * self.warps_n
        stage = rows * STAGE_K // 2 + 8 * self.n_tiles * STAGE_K + STAGE_K // group * rows * 2
        sums = (self.warps_k - 1) * self.warps_n * self.n_tiles * 1024
        return max(self.stages * stage, sums)


def mma_config(m: int, N: int, K: int) -> MmaConfig:
    """The configuration for ``m <= 64`` rows of an ``(N, K)`` weight: 128 weight rows
    over 4 x 2 warps, 4 stages, K split until there are about two programs a
    multiprocessor (a product must keep about 30 KB of weights in flight per SM to
    reach the memory's bandwidth)."""
    tiles = -(-N // 128)
    split = 1
    while tiles * split * 2 <= 264 and (K // STAGE_K) % (split * 2) == 0 and split < 8:
        split *= 2
    return MmaConfig(4, 2, 2 * -(-min(m, 64) // 16), 4, split)


def fits(q: Tensor, packed: Tensor, scales: Tensor) -> bool:
    """Whether the operands meet the kernel's alignment: K in whole stages, N a multiple
    of 8, 16-byte aligned rows and scale chunks, int8 rows contiguous."""
    K, N = q.shape[1], packed.shape[0]
    return (K % STAGE_K == 0 and N % 8 == 0 and (K // scales.shape[0]) in (32, 64, 128)
            and q.is_contiguous() and packed.is_contiguous() and scales.stride(1) == 1
            and scales.stride(0) % 8 == 0 and all(t.data_ptr() % 16 == 0
                                                  for t in (q, packed, scales)))


@cache
def _kernel(cfg: MmaConfig, group: int, out: int, device: int, probe: int = 0) -> Any:
    name = (f"w4a8_mma<{cfg.warps_n}, {cfg.warps_k}, {cfg.n_tiles}, {cfg.stages}, {group}, "
            f"{out}, {probe}>")
    with torch.cuda.device(device):
        kernel = torch.cuda._compile_kernel(SOURCE.read_text(), name)
        kernel.set_shared_memory_config(cfg.shared_bytes(group))
    return kernel


@cache
def available(device: int) -> bool:
    """Whether NVRTC compiles the kernel here (compute capability 8.0+ for its
    instructions); False falls back to the Triton kernel."""
    if torch.cuda.get_device_capability(device) < (8, 0):
        return False
    try:
        _kernel(MmaConfig(4, 2, 4, 4, 1), 128, 0, device)
    except Exception as err:  # any compiler or driver failure: not on this machine
        warnings.warn(f"W4A8 products fall back to Triton: NVRTC failed ({err})",
                      stacklevel=2)
        return False
    return True


def w4a8_mma(q: Tensor, x_scale: Tensor, packed: Tensor, scales: Tensor, dtype: torch.dtype,
             cfg: MmaConfig | None = None, partials: bool = False) -> Tensor:
    """:func:`ruvdllm.kernels.w4a8.w4a8_matmul` (same operands, output and
    ``partials``) for operands that :func:`fits`; up to 64 rows a program."""
    M, K = q.shape
    N = packed.shape[0]
    group = K // scales.shape[0]
    cfg = cfg or mma_config(M, N, K)
    if not fits(q, packed, scales) or (K // STAGE_K) % cfg.split_k:
        raise ValueError(f"w4a8_mma: int8 rows {tuple(q.shape)}, weight {tuple(packed.shape)} "
                         f"and scales {tuple(scales.shape)} need K in {cfg.split_k} slices of "
                         f"{STAGE_K}, N a multiple of 8 and 16-byte aligned rows")
    split = cfg.split_k
    y = split_k_output(M, N, split, dtype, q.device, partials)  # (M, N) or (S, M, N)
    out = _OUT[dtype] if split == 1 else 2 if partials else 3
    bm = 8 * cfg.n_tiles
    grid = (-(-N // (32 * cfg.warps_n)), split, -(-M // bm))
    _kernel(cfg, group, out, q.device.index or 0, PROBE)(
        grid=grid, block=(32 * cfg.warps_n * cfg.warps_k, 1, 1),
        args=[q, x_scale, packed, scales, y, M, N, K, scales.stride(0)],
        shared_mem=cfg.shared_bytes(group))
    return y if partials or split == 1 else y.to(dtype)
