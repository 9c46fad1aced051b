"""FBGEMM GenAI's Hopper int4 products against ruvdllm's W4A8 kernel, product by product.

Issue #6 asks for the int4 GPU product that measures best among torch's, torchao's and
a hand-written one. On Hopper, torchao's int4 formats for CUDA (`preshuffled`) call
FBGEMM GenAI's CUTLASS kernels, so those are measured here directly:

* ``f8i4bf16_shuffled``: float8 rows (one scale per row) times int4 weights in FBGEMM's
  pre-shuffled layout, the weights quantized twice (to float8 with one scale per output
  channel, then to int4 with a float8 scale per group of 128);
* ``bf16i4bf16_shuffled``: bfloat16 rows times the same int4 layout with bfloat16 group
  scales (weight-only).

Both against :func:`ruvdllm.kernels.w4a8.w4a8_matmul` at its chosen tile, every product
of the 8B shape, timed as the fast path runs them (:func:`bench.gpu.graph_us`: CUDA-graph
replays over weight copies no cache holds). Each output is checked against the product
of the operands it was given, dequantized in float32.

FBGEMM is not a dependency: the device carries its wheel (docs/benchmarks.md gives the
command), ``fbgemm-gpu-genai`` 1.6.0, the release made for torch 2.11.

``python3 -m bench.fbgemm_probe [rows,...]``: µs per product, rows 32, 64 and 384 by
default; then µs per cached step (32 layers' products and the LM head).
"""

from __future__ import annotations

import json
import sys
from functools import partial

import torch
from torch import Tensor

GROUP = 128
FP8_MAX = 448.0  # float8 e4m3


def _pack(q: Tensor) -> Tensor:
    """int4 values ``(N, K)`` in int8 as bytes ``(N, K/2)``: column 2j low, 2j + 1 high."""
    return (q[:, ::2] & 0xF) | (q[:, 1::2] << 4)


def _int4_groups(w: Tensor, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """``w`` float32 ``(N, K)`` as FBGEMM's symmetric int4 with one scale of
    ``scale_dtype`` per group: the packed bytes in FBGEMM's shuffled layout, the
    shuffled scales, and the weight they stand for (float32 ``(N, K)``)."""
    N, K = w.shape
    groups = w.view(N, K // GROUP, GROUP)  # (N, K/G, G)
    gs = (groups.abs().amax(-1).clamp(min=1e-6) / 8).to(scale_dtype)  # (N, K/G)
    q = (groups / gs.float()[..., None]).round().clamp(-8, 7)  # (N, K/G, G)
    dense = (q * gs.float()[..., None]).view(N, K)
    wq, gsp = torch.ops.fbgemm.preshuffle_i4(_pack(q.to(torch.int8).view(N, K)),
                                             gs.t().contiguous())
    return wq, gsp, dense


def quantize_f8i4(w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``w`` ``(N, K)`` in FBGEMM's f8i4 format: shuffled bytes, row scales ``(N,)``,
    shuffled float8 group scales; and the weight they stand for, float32 ``(N, K)``."""
    row = w.float().abs().amax(1).clamp(min=1e-12) / FP8_MAX  # (N,)
    w8 = (w.float() / row[:, None]).to(torch.float8_e4m3fn).float()
    wq, gsp, dense = _int4_groups(w8, torch.float8_e4m3fn)
    return wq, row, gsp, dense * row[:, None]


def quantize_bf16i4(w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``w`` ``(N, K)`` for ``bf16i4bf16_shuffled``: shuffled bytes, bfloat16 group scales
    (shuffled) and zero points (symmetric: zeros); and the weight they stand for."""
    wq, gsp, dense = _int4_groups(w.float(), torch.bfloat16)
    zeros = torch.zeros(w.shape[1] // GROUP, w.shape[0], dtype=torch.bfloat16, device=w.device)
    return wq, gsp, zeros, dense


def run(rows: tuple[int, ...]) -> None:
    """Print µs per product of each kernel (with its error against its own operands),
    then µs per cached step."""
    import fbgemm_gpu.experimental.gen_ai  # noqa: F401  (registers torch.ops.fbgemm)

    from bench.gpu import SHAPES, graph_us, rel_err, weight_copies
    from ruvdllm.kernels.w4a8 import w4a8_matmul
    from ruvdllm.quant import W4A8Linear, quantize_activations_int8

    gen = torch.Generator(device="cuda").manual_seed(0)
    step: dict[int, dict[str, float]] = {m: {} for m in rows}
    for N, K in SHAPES:
        lin = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
        ours = W4A8Linear.from_linear(lin, GROUP)
        f8 = quantize_f8i4(lin.weight.detach())
        b16 = quantize_bf16i4(lin.weight.detach())
        head = N > 100_000  # the LM head: once a step, and only on a step's block rows
        for M in rows:
            if head and M > 64:
                continue
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=gen)
            xq, xs = quantize_activations_int8(x)
            x8, x8s = torch.ops.fbgemm.quantize_fp8_per_row(x)
            x_i8 = xq.float() * xs[:, None]
            x_f8 = x8.float() * x8s.float()[:, None]
            errs = {
                "w4a8": rel_err(w4a8_matmul(xq, xs, ours.weight, ours.scales, torch.bfloat16),
                             x_i8 @ ours.dequantize().float().t()),
                "f8i4": rel_err(torch.ops.fbgemm.f8i4bf16_shuffled(x8, f8[0], x8s, f8[1], f8[2]),
                             x_f8 @ f8[3].t()),
                "bf16i4": rel_err(torch.ops.fbgemm.bf16i4bf16_shuffled(x, *b16[:3]),
                               x.float() @ b16[3].t())}
            times = {
                "w4a8": graph_us([partial(w4a8_matmul, xq, xs, p, s, torch.bfloat16)
                                  for p, s in weight_copies((ours.weight, ours.scales))]),
                "f8i4": graph_us([partial(torch.ops.fbgemm.f8i4bf16_shuffled, x8, wq, x8s, r, g)
                                  for wq, r, g in weight_copies(f8[:3])]),
                "bf16i4": graph_us([partial(torch.ops.fbgemm.bf16i4bf16_shuffled, x, wq, g, z)
                                    for wq, g, z in weight_copies(b16[:3])])}
            for k, v in times.items():
                step[M][k] = step[M].get(k, 0.0) + v * (1 if head else 32)
            print(f"N={N} K={K} M={M} µs", json.dumps({k: round(v, 1) for k, v in times.items()}),
                  "errors", json.dumps({k: round(v, 4) for k, v in errs.items()}), flush=True)
        del lin, ours, f8, b16
        torch.cuda.empty_cache()
    for M, sums in step.items():
        label = "layers and LM head" if M <= 64 else "layers"
        print(f"M={M} µs per step ({label})", json.dumps({k: round(v) for k, v in sums.items()}),
              flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 2:
        sys.exit("usage: python3 -m bench.fbgemm_probe [rows,...]")
    run(tuple(int(m) for m in sys.argv[1].split(",")) if len(sys.argv) == 2 else (32, 64, 384))
