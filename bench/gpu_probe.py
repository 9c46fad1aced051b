"""Where the 8B fast path's time goes (CUDA): product variants and a kernel profile.

``python3 -m bench.gpu_probe scaled-mm``: for every product of the 8B shape, bf16
cuBLAS against ``torch._scaled_mm`` with one scale per tensor (cuBLAS) and with row
scales (CUTLASS), fast accumulation or not, timed with :func:`bench.gpu.graph_us`;
the choice in :func:`ruvdllm.quant.fp8_matmul` comes from this table.

``python3 -m bench.gpu_probe w4a8-tiles [group [rows,...]]``: every W4A8 tile configuration
on every product of the 8B shape (int4 groups of ``group``, default 128), timed
the same way; :func:`ruvdllm.kernels.w4a8.w4a8_config` comes from this table.

``python3 -m bench.gpu_probe sdpa``: attention of the 8B shape by SDPA backend;
``sdpa-kernels``: the kernels each way of calling it launches (cuDNN's memset).

``python3 -m bench.gpu_probe variants fp8``: the fp8 fast path's graphed wall times with
float8 inputs quantized per row by their producers from 512 rows, and with one scale per
tensor, in one process.

``python3 -m bench.gpu_probe variants``: the W4A8 fast path's graphed wall times with
session 7's product tiles and this code's, and with SDPA's backends in other orders, in
one process (sessions 5-7 timed programmatic dependent launch and split-K terms summed
by the norm kernels the same way: docs/decisions.md).

``python3 -m bench.gpu_probe rows [w4a8|bf16]``: one graphed forward of the 8B shape at B=1
by encoded rows and attended slots: what a step costs at each size the samplers use (384: the
whole sequence; 160: prompt and block under a suffix window of 0; 64: a delayed refresh).

``python3 -m bench.gpu_probe profile [bf16|w4|fp8|w4a8 ...]``: the fast path's kernels
under ``torch.profiler`` (graphs off, so each kernel is seen; their sum is within a
few percent of the graphed wall time, also printed), for 8 steps at B=1 and B=8 and
64 steps at B=1, the most expensive kernels first.

Figures in docs/decisions.md ("Session 5").
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from bench.gpu import SHAPES, graph_us, rel_err, weight_copies
from bench.inference import LLADA_8B, llada8b, random_prompts
from ruvdllm.fast_sampler import FastSampler
from ruvdllm.quant import (
    W4A8Linear,
    quantize_activations_int8,
    quantize_fp8,
    quantize_fp8_activations,
    quantize_model,
)
from ruvdllm.sampler import SamplerConfig


def _fp8_product(xq: torch.Tensor, weight: torch.Tensor, scale_a: torch.Tensor,
                 scale_b: torch.Tensor, fast: bool) -> torch.Tensor:
    return torch._scaled_mm(xq, weight.t(), scale_a=scale_a, scale_b=scale_b,
                            out_dtype=torch.bfloat16, use_fast_accum=fast)


def scaled_mm_rows() -> None:
    """Print µs per product: bf16 and the float8 variants, at the rows of a step."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    for N, K in SHAPES:
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        q, scale = quantize_fp8(w)
        bf16s, fp8s = weight_copies((w,)), weight_copies((q,))
        for M in (32, 64, 256, 512, 3072):
            if N > 100_000 and M > 512:  # the LM head only sees a step's block rows
                continue
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=gen)
            xq, xs = quantize_fp8_activations(x)
            rows, cols = xs.expand(M, 1).contiguous(), scale.expand(1, N).contiguous()

            cands: dict[str, list[Callable[[], object]]] = {
                "bf16": [partial(F.linear, x, c) for (c,) in bf16s]}
            for rowwise in (False, True):
                a, b = (rows, cols) if rowwise else (xs, scale[0])
                for fast in (False, True):
                    name = f"{'row' if rowwise else 'tensor'}{'_fast' if fast else ''}"
                    cands[name] = [partial(_fp8_product, xq, c, a, b, fast) for (c,) in fp8s]
            times = {name: round(graph_us(fns), 1) for name, fns in cands.items()}
            print(f"N={N} K={K} M={M}", json.dumps(times), flush=True)


def w4a8_tile_rows(group: int, rows: tuple[int, ...] = (32, 64, 384, 512, 3072)) -> None:
    """Print µs per W4A8 product (quantized input given) for each tile configuration,
    at the rows of a step; the choice in :func:`ruvdllm.kernels.w4a8.w4a8_config`
    comes from this table."""
    from triton.runtime.errors import OutOfResources

    from ruvdllm.kernels.w4a8 import W4A8Config, w4a8_config, w4a8_matmul

    # up to 64 rows: weight rows per program and warps (one or two warpgroups' wgmma;
    # mma.sync tiles, 16-32 rows over 1-4 warps, were 1.3-4x slower: session 7), K split,
    # two groups per iteration over 3 or 4 stages, or four over 3 (four over 2: slower,
    # session 8)
    small = [W4A8Config(0, bn, w, st, sk, u) for bn, w in ((64, 4), (128, 8))
             for sk in (1, 2, 4, 8) for st, u in ((3, 2), (4, 2), (3, 4))]
    large = [W4A8Config(bm, bn, w, st, 1, u) for bm, bn, w in ((64, 64, 4), (128, 64, 4),
                                                              (128, 128, 8))
             for st, u in ((3, 1), (3, 2), (4, 2), (3, 4))]
    gen = torch.Generator(device="cuda").manual_seed(0)
    for N, K in SHAPES:
        lin = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
        q = W4A8Linear.from_linear(lin, group)
        copies = weight_copies((q.weight, q.scales))
        bf16s = weight_copies((lin.weight,))
        for M in rows:
            if N > 100_000 and M > 512:  # the LM head only sees a step's block rows
                continue
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=gen)
            xq, xs = quantize_activations_int8(x)
            cfgs = ([c._replace(block_m=max(16, 1 << (M - 1).bit_length())) for c in small]
                    if M <= 64 else large)
            times = {"bf16": round(graph_us([partial(F.linear, x, w) for (w,) in bf16s]), 1),
                     "quantize": round(graph_us([partial(quantize_activations_int8, x)]), 1),
                     f"chosen {tuple(w4a8_config(M, N, K))}": round(graph_us(
                         [partial(w4a8_matmul, xq, xs, p, s, x.dtype) for p, s in copies]), 1)}
            for c in cfgs:
                try:
                    times[str(tuple(c))] = round(graph_us(
                        [partial(w4a8_matmul, xq, xs, p, s, x.dtype, c) for p, s in copies]), 1)
                except OutOfResources:  # more shared memory than the GPU has
                    times[str(tuple(c))] = float("inf")
            best = min((k for k in times if k.startswith("(")), key=lambda k: times[k])
            print(f"N={N} K={K} M={M} best {best} {times[best]}", json.dumps(times), flush=True)
        del lin, q, copies, bf16s
        torch.cuda.empty_cache()


def sdpa_rows() -> None:
    """Print µs per attention of the 8B shape (32 heads of 128 over 384 keys) by SDPA
    backend, at a cached step's 32 and 64 queries and the first step's 384, B = 1 and 8;
    each call reads its own copy of the keys and values, as a step's 32 layers do."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    H, hd, L = LLADA_8B.n_heads, LLADA_8B.head_dim, 384
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    for B in (1, 8):
        kvs = [tuple(torch.randn(B, H, L, hd, device="cuda", dtype=torch.bfloat16)
                     for _ in range(2)) for _ in range(16)]
        for T in (32, 64, 384):
            q = torch.randn(B, T, H, hd, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
            times = {}
            for name, backend in backends.items():
                with sdpa_kernel(backend):
                    times[name] = round(graph_us([partial(F.scaled_dot_product_attention,
                                                          q, k, v) for k, v in kvs]), 1)
            print(f"sdpa B={B} T={T}", json.dumps(times), flush=True)


def sdpa_kernels() -> None:
    """Kernels and graph-timed µs of one cached step's attention (B=1, 32 queries over
    384 keys) through SDPA, its cuDNN op without the log-sum-exp, and flash."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 32, 32, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, T, hd) over (B, T, H, hd)
    k, v = (torch.randn(1, 32, 384, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
            for _ in range(2))
    ref = F.scaled_dot_product_attention(q, k, v).float()
    ops = torch.ops.aten
    calls = {"sdpa": partial(F.scaled_dot_product_attention, q, k, v),
             "cudnn, no lse": partial(ops._scaled_dot_product_cudnn_attention, q, k, v, None,
                                      False),
             "flash": partial(ops._scaled_dot_product_flash_attention, q, k, v)}
    for name, fn in calls.items():
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        err = rel_err(out, ref)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        names = [e.key[:60] for e in prof.key_averages()]
        print(name, f"error {err:.2e}", round(graph_us([fn] * 32), 2), "µs", names, flush=True)


def _kernel_table(fn: Callable[[], object], label: str, top: int = 14) -> None:
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    by: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by[e.name[:90]][0] += e.time_range.elapsed_us()
            by[e.name[:90]][1] += 1
    total = sum(us for us, _ in by.values())
    print(f"== {label}: kernel sum {total / 1e3:.2f} ms over "
          f"{int(sum(n for _, n in by.values()))} kernels", flush=True)
    for name, (us, n) in sorted(by.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"   {us / 1e3:8.2f} ms {int(n):6d}  {name}")


def _wall_ms(fn: Callable[[], object], n: int = 5) -> float:
    fn()
    fn()
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def profile(quant: str) -> None:
    """Graphed wall time and the eager kernel table of each schedule, one precision."""
    model = llada8b(torch.bfloat16)
    if quant == "w4":
        quantize_model(model, "int4", embedding=True)
    elif quant == "fp8":
        quantize_model(model, "fp8")
    elif quant == "w4a8":
        quantize_model(model, "w4a8", group_size=128, embedding=True)
    torch.cuda.empty_cache()
    graphed, eager = FastSampler(model), FastSampler(model, graphs=False)
    for label, prompts, cfg in _schedules():
        ms = _wall_ms(partial(graphed.generate, prompts, cfg))
        print(f"{quant} {label}: graphed wall {ms:.2f} ms", flush=True)
        _kernel_table(partial(eager.generate, prompts, cfg), f"{quant} {label}")


def forward_rows(quant: str) -> None:
    """Print ms per graphed ``forward_into`` at B=1 for (slots attended, rows encoded)."""
    from ruvdllm.model import StaticKV

    model = llada8b(torch.bfloat16)
    if quant == "w4a8":
        quantize_model(model, "w4a8", group_size=128, embedding=True)
    model.fuse_projections()
    torch.cuda.empty_cache()
    for L, T in ((384, 384), (256, 256), (224, 224), (192, 192), (160, 160), (384, 128),
                 (384, 96), (384, 64), (160, 64), (384, 32)):
        buffers = StaticKV.empty(model.config, 1, L, torch.bfloat16, torch.device("cuda"))
        ids = torch.randint(4, 100_000, (1, T), device="cuda")
        slots = torch.arange(L - T, L, device="cuda")  # the last T slots, as a block would be
        block = torch.arange(T - 32, T, device="cuda")  # logits for 32 rows
        with torch.no_grad():
            us = graph_us([partial(model.forward_into, ids, slots[None], slots, buffers, None,
                                   block)])
        print(f"{quant} slots={L} rows={T}: {us / 1e3:.3f} ms", flush=True)
        del buffers


def launch_variants() -> None:
    """Graphed wall time of each schedule, W4A8, in one process: the product tiles of
    session 8 against session 7's, and SDPA's backends in another order.
    :func:`ruvdllm.kernels.w4a8.w4a8_config` comes from this."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ruvdllm.kernels import w4a8

    model = llada8b(torch.bfloat16)
    quantize_model(model, "w4a8", group_size=128, embedding=True)
    torch.cuda.empty_cache()
    schedules = _schedules()
    tiles = w4a8.w4a8_config

    def session7(m: int, N: int, K: int) -> w4a8.W4A8Config:  # 3 stages, 2 groups
        return tiles(m, N, K)._replace(stages=3, unroll=2)

    cudnn, flash, efficient, math = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                     SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
    variants = (("session 7 tiles", session7, [cudnn, flash, efficient, math]),
                ("session 8 tiles", tiles, [cudnn, flash, efficient, math]),  # SDPA's own
                ("session 8, flash attention first", tiles, [flash, cudnn, efficient, math]),
                ("session 8, efficient attention first", tiles,
                 [efficient, cudnn, flash, math]))
    try:
        for _ in range(2):  # twice, to see the drift between variants
            for name, choice, backends in variants:
                w4a8.w4a8_config = choice
                sampler = FastSampler(model)
                with sdpa_kernel(backends, set_priority=True):  # graphs capture the choice
                    walls = {label: round(_wall_ms(partial(sampler.generate, prompts, cfg)),
                                          2) for label, prompts, cfg in schedules}
                print(f"w4a8 {name}:", json.dumps(walls), flush=True)
                del sampler
                torch.cuda.empty_cache()
    finally:
        w4a8.w4a8_config = tiles


def fp8_variants() -> None:
    """Graphed wall time of 8 steps at B=8 and B=1, fp8, in one process: inputs quantized
    per row by the kernels that write them from :data:`ruvdllm.quant.FP8_ROWS` rows (this
    code) against one scale per tensor at every size (a reduction or the producer's row
    maxima, then a quantization kernel: session 8's products but for the 3 072-row ones,
    which ran row-scaled with the tensor's scale broadcast)."""
    from ruvdllm import quant

    model = llada8b(torch.bfloat16)
    quantize_model(model, "fp8")
    torch.cuda.empty_cache()
    schedules = _schedules()[1::-1]  # B=8 first; 64 steps has 32-64 rows: unchanged
    rows = quant.FP8_ROWS
    try:
        for _ in range(2):  # twice, to see the drift between variants
            for name, threshold in (("rows from 512", rows), ("one scale per tensor", 1 << 62)):
                quant.FP8_ROWS = threshold
                sampler = FastSampler(model)
                walls = {label: round(_wall_ms(partial(sampler.generate, prompts, cfg)), 2)
                         for label, prompts, cfg in schedules}
                print(f"fp8 {name}:", json.dumps(walls), flush=True)
                del sampler
                torch.cuda.empty_cache()
    finally:
        quant.FP8_ROWS = rows


def _schedules() -> list[tuple[str, list[list[int]], SamplerConfig]]:
    """The profile's three runs: 8 steps at B=1 and B=8, 64 steps with threshold at B=1."""
    one = random_prompts(1, 128, LLADA_8B.vocab_size)
    eight = random_prompts(8, 128, LLADA_8B.vocab_size)
    eight_steps = SamplerConfig(steps=8, gen_length=256, block_length=32, cache="delayed")
    long = SamplerConfig(steps=64, gen_length=256, block_length=32, cache="delayed",
                         threshold=0.9)
    return [("8 steps B=1", one, eight_steps), ("8 steps B=8", eight, eight_steps),
            ("64 steps B=1", one, long)]


if __name__ == "__main__":
    usage = ("usage: python3 -m bench.gpu_probe scaled-mm | w4a8-tiles [group [rows,...]] | "
             "sdpa | sdpa-kernels | variants [fp8] | rows [w4a8|bf16] | "
             "profile [bf16|w4|fp8|w4a8 ...]")
    if len(sys.argv) < 2 or sys.argv[1] not in ("scaled-mm", "w4a8-tiles", "sdpa",
                                                 "sdpa-kernels", "variants", "rows", "profile"):
        sys.exit(usage)
    if sys.argv[1] == "scaled-mm":
        scaled_mm_rows()
    elif sys.argv[1] == "sdpa":
        sdpa_rows()
    elif sys.argv[1] == "sdpa-kernels":
        sdpa_kernels()
    elif sys.argv[1] == "rows":
        if sys.argv[2:] not in ([], ["w4a8"], ["bf16"]):
            sys.exit(usage)
        forward_rows((sys.argv[2:] or ["w4a8"])[0])
    elif sys.argv[1] == "variants":
        fp8_variants() if sys.argv[2:] == ["fp8"] else launch_variants()
    elif sys.argv[1] == "w4a8-tiles":
        group = int(sys.argv[2]) if len(sys.argv) > 2 else 128
        if len(sys.argv) > 3:  # rows, comma-separated
            w4a8_tile_rows(group, tuple(int(m) for m in sys.argv[3].split(",")))
        else:
            w4a8_tile_rows(group)
    else:
        for q in sys.argv[2:] or ["bf16"]:
            if q not in ("bf16", "w4", "fp8", "w4a8"):
                sys.exit(f"unknown precision {q!r}: bf16, w4, fp8 or w4a8")
            profile(q)
