"""The LLaDA-8B shape on CUDA: check, then time the fast path against the reference.

Called by the ``inference`` and ``memory`` sections under ``--device cuda``
(``ruvdllm-bench --device cuda --only inference,memory``). One run:

1. kernels: every product of the 8B shape at the token counts of a step
   (``M``), Triton int4/int8 against bfloat16 cuBLAS, dequantize-then-cuBLAS
   and the fp8 (W8A8) product, each checked against a float32 product first
   (relative error rows);
2. agreement: tokens of the fast path against the reference sampler, on the
   default (trained) model in float32 and on the 8B shape in bfloat16; and
   ``Runtime.generate`` on the default model, its fast path against the reference;
3. latency: the naive reference (:func:`naive_generate`: issue #6's definition,
   eager, a full forward with every position's logits every step) and the fast
   path (``FastSampler``: caches, threshold, CUDA graphs) on the 8B shape with
   random weights, in each precision of ``llada8b_precisions``: bfloat16, int4
   (W4: every linear and the embedding), fp8 (W8A8: every linear), W4A8 (int4
   weights, int8 activations; int4 embedding), interleaved rounds, medians; each
   cache mode and block length, the best is the headline; the headline once
   more with the eager element-wise ops instead of the fused kernels.

Random weights carry no meaning, so a confidence threshold rarely fires on
them: the 64-step figure is an upper bound of what a trained model needs.
Kernel times come from :func:`graph_us` (CUDA-graph replays over weight copies
larger than L2, median), the way the fast path runs them.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

import ruvdllm.model as model_module
from bench.common import BenchContext, Row, agreement, percentile
from bench.inference import LLADA_8B, bench_prompts, latency_rows, llada8b, measure, random_prompts
from ruvdllm.fast_sampler import FastSampler
from ruvdllm.model import DiffusionLM
from ruvdllm.quant import (
    Fp8Linear,
    Int4Linear,
    Int8Linear,
    W4A8Linear,
    fp8_matmul,
    quantize_activations_int8,
    quantize_model,
    weight_bytes,
)
from ruvdllm.runtime import load
from ruvdllm.sampler import CacheMode, Sampler, SamplerConfig

# (out, in) of every linear of the 8B shape: q/k/v/attn_out, ff_proj/up_proj,
# ff_out (MLP down), the LM head; 12288 x 4096 is also the fused q/k/v product and
# 24576 x 4096 the fused gate/up product.
SHAPES = ((4096, 4096), (12288, 4096), (24576, 4096), (4096, 12288), (126464, 4096))
DEVICE_COPY_TBS = 2.94  # H100 device-to-device copy, bytes read + written (issue #6)


_ROTATE_BYTES = 192 << 20  # weight copies per timing: together ~4x the H100's 50 MB L2


def graph_us(calls: list[Callable[[], object]], replays: int = 20) -> float:
    """Median µs of one of ``calls``, timed as CUDA-graph replays of all of them in a row.

    The fast path runs every weight-only product inside a CUDA graph, one after
    another, each on a weight no cache holds; this times them the same way.
    ``calls`` are one product on different copies of its weight (together
    larger than L2, :func:`weight_copies`), so each call reads its weight from
    memory, and a replay has no Python in it: the time is the device's alone.
    (``triton.testing.do_bench`` times one Python call between two events after
    flushing L2; docs/benchmarks.md compares the two.)
    """
    for fn in calls:  # compile and warm up outside the capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    for start, end in zip(starts, ends, strict=True):
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    ms = sorted(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))
    del graph
    return ms[replays // 2] / len(calls) * 1e3


def weight_copies(tensors: tuple[torch.Tensor, ...]) -> list[tuple[torch.Tensor, ...]]:
    """``tensors`` and clones of them, enough that together they exceed L2 several times."""
    size = sum(t.numel() * t.element_size() for t in tensors)
    n = max(2, min(24, -(-_ROTATE_BYTES // size)))
    return [tensors] + [tuple(t.clone() for t in tensors) for _ in range(n - 1)]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm())


def _w4a8(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The W4A8 product as its linear runs it: the rows' int8 quantization, then the kernel."""
    from ruvdllm.kernels.w4a8 import w4a8_matmul  # Triton: CUDA only

    return w4a8_matmul(*quantize_activations_int8(x), packed, scales, x.dtype)


def kernel_rows(ctx: BenchContext, tokens: list[int], w4a8_group: int) -> list[Row]:
    """Time (µs, :func:`graph_us`) and error of each weight-only product candidate."""
    from ruvdllm.kernels.weight_only import (  # Triton: CUDA only
        _int4_fused,
        int4_dequantize,
        int4_matmul,
        int8_matmul,
        uses_dequantize,
    )

    rows: list[Row] = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for N, K in SHAPES:
        lin = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
        torch.nn.init.normal_(lin.weight, std=0.02, generator=gen)
        q4, q8 = Int4Linear.from_linear(lin, 32), Int8Linear.from_linear(lin)
        f8, a8 = Fp8Linear.from_linear(lin), W4A8Linear.from_linear(lin, w4a8_group)
        w4, w8 = q4.dequantize(torch.float32), q8.dequantize(torch.float32)
        bf16s = weight_copies((lin.weight,))
        int4s = weight_copies((q4.weight, q4.scales))
        int8s = weight_copies((q8.weight, q8.scales))
        fp8s = weight_copies((f8.weight, f8.scales))
        w4a8s = weight_copies((a8.weight, a8.scales))
        for M in tokens:
            if N > 100_000 and M > 512:  # the LM head only sees a step's block rows
                continue
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=gen)
            label = f"N={N},K={K},M={M}"
            if M in (tokens[0], tokens[-1]):
                for name, y, w in (("int4", _int4_fused(x, q4.weight, q4.scales), w4),
                                   ("int4_dequant", F.linear(x, int4_dequantize(
                                       q4.weight, q4.scales, x.dtype)), w4),
                                   ("int8", int8_matmul(x, q8.weight, q8.scales), w8)):
                    rows.append(ctx.row("inference", f"kernel_rel_err{{{name},{label}}}",
                                        rel_err(y, x.float() @ w.t()), "",
                                        note="Triton vs float32 product of the dequantized "
                                             "weight"))
                exact = x.float() @ lin.weight.float().t()
                for name, y in (("fp8", fp8_matmul(x, f8.weight, f8.scales)),
                                (f"w4a8_g{w4a8_group}", _w4a8(x, a8.weight, a8.scales))):
                    rows.append(ctx.row("inference", f"kernel_rel_err{{{name},{label}}}",
                                        rel_err(y, exact), "",
                                        note="vs float32 product of the bfloat16 weight "
                                             "(weight and input quantization's error)"))
            candidates: dict[str, list[Callable[[], object]]] = {
                "bf16": [partial(F.linear, x, w) for (w,) in bf16s],
                "int4": [partial(int4_matmul, x, p, s) for p, s in int4s],
                "int4_fused": [partial(_int4_fused, x, p, s) for p, s in int4s],
                "int8": [partial(int8_matmul, x, w, s) for w, s in int8s],
                "fp8": [partial(fp8_matmul, x, w, s) for w, s in fp8s],
                f"w4a8_g{w4a8_group}": [partial(_w4a8, x, p, s) for p, s in w4a8s],
            }
            int4_bytes = N * K // 2 + q4.scales.numel() * 2
            w4a8_bytes = N * K // 2 + a8.scales.numel() * 2
            for name, fns in candidates.items():
                us = graph_us(fns)
                note = ""
                if name == "int4":
                    path = "dequant + cuBLAS" if uses_dequantize(M, q4.weight) else "fused"
                    note = (f"{path}; weight bytes at {int4_bytes / us / 1e6 / DEVICE_COPY_TBS:.0%}"
                            f" of {DEVICE_COPY_TBS} TB/s")
                elif name.startswith("w4a8"):
                    note = (f"int8 row quantization + kernel; weight bytes at "
                            f"{w4a8_bytes / us / 1e6 / DEVICE_COPY_TBS:.0%} of "
                            f"{DEVICE_COPY_TBS} TB/s")
                rows.append(ctx.row("inference", f"kernel_us{{{name},{label}}}", us, "us",
                                    note=note))
        del lin, q4, q8, f8, a8, w4, w8, bf16s, int4s, int8s, fp8s, w4a8s
        torch.cuda.empty_cache()
    return rows


def agreement_rows(ctx: BenchContext, params: dict[str, Any]) -> list[Row]:
    """Fast path vs reference tokens on the default model (float32, CUDA)."""
    rt = load("default", device="cuda")
    prompts = bench_prompts(rt.tokenizer, 8, 64)
    G, steps = params["agreement_output_length"], params["agreement_steps"]
    ref = Sampler(rt.model).generate(prompts, SamplerConfig(steps=steps, gen_length=G,
                                                            block_length=32))
    fast = FastSampler(rt.model)
    rows = []
    variants: list[tuple[CacheMode, float | None, int | None]] = [
        ("none", None, None), ("prefix", None, None), ("dual", None, None),
        ("dual", params["threshold"], None), ("delayed", None, None),
        ("delayed", params["threshold"], None)]
    variants += [(c, None, s) for s in params["suffixes"] for c in ("none", "delayed")]
    for cache, threshold, suffix in variants:
        cfg = SamplerConfig(steps=steps, gen_length=G, block_length=32, cache=cache,
                            threshold=threshold, suffix=suffix)
        got = fast.generate(prompts, cfg)
        window = "" if suffix is None else f",suffix={suffix}"
        rows.append(ctx.row("inference", f"agreement_pct{{default,cache={cache},"
                                          f"threshold={threshold}{window}}}",
                            agreement(got, ref, G),
                            "%", note=f"fast path vs reference (no cache, fixed {steps} steps), "
                                      f"8 held-out prompts, {G} tokens, float32; "
                                      f"{fast.forwards} steps run in the last batch"))
    del rt, fast
    torch.cuda.empty_cache()
    return rows


def runtime_rows(ctx: BenchContext, params: dict[str, Any]) -> list[Row]:
    """``Runtime.generate`` on CUDA (default model, float32): its fast path against the
    reference sampler it ran before, timed interleaved, text to text (tokenizer included)."""
    fast, ref = (load("default", device="cuda", fast=f) for f in (True, False))
    prompt = fast.tokenizer.decode(bench_prompts(fast.tokenizer, 1, 64)[0])
    options = dict(steps=params["agreement_steps"], gen_length=params["agreement_output_length"],
                   block_length=32, cache="delayed")
    same = fast.generate(prompt, **options) == ref.generate(prompt, **options)
    ms = _time({"fast": partial(fast.generate, prompt, **options),
                "reference": partial(ref.generate, prompt, **options)},
               params["llada8b_iterations"])
    what = (f"Runtime.generate, default model, float32, B=1, {options['gen_length']} tokens, "
            f"{options['steps']} steps, delayed cache")
    rows = [ctx.row("inference", f"runtime_generate_p50_ms{{default,sampler={name}}}", v, "ms",
                    note=what) for name, v in ms.items()]
    rows.append(ctx.row("inference", "runtime_fast_path_speedup{default}",
                        ms["reference"] / ms["fast"], "x",
                        note=f"{what}; same text as the reference: {same}"))
    del fast, ref
    torch.cuda.empty_cache()
    return rows


def _time(fns: dict[str, Callable[[], object]], iterations: int) -> dict[str, float]:
    """Median ms of each function (interleaved rounds, two untimed: capture, autotune)."""
    t = measure(fns, iterations, 2, "cuda")
    return {name: percentile(s, 50) * 1e3 for name, s in t.items()}


def _latency(ctx: BenchContext, prefix: str, fn: Callable[[], object], iterations: int,
             batch: int, tokens: int) -> list[Row]:
    t = measure({"gen": fn}, iterations, 2, "cuda")
    return latency_rows(ctx, prefix, t["gen"], batch, tokens)


@contextmanager
def _eager() -> Iterator[None]:
    """Eager element-wise ops and separate projections (no fused kernels, no fused products)."""
    model_module.FUSED_KERNELS = model_module.FUSED_PROJECTIONS = False
    try:
        yield
    finally:
        model_module.FUSED_KERNELS = model_module.FUSED_PROJECTIONS = True


def _eager_ms(fn: Callable[[], object], iterations: int) -> float:
    """``fn``'s median ms with the eager element-wise ops (fresh graphs: new sampler)."""
    model_module.FUSED_KERNELS = False
    try:
        return _time({"eager": fn}, iterations)["eager"]
    finally:
        model_module.FUSED_KERNELS = True


@torch.no_grad()
def naive_generate(model: DiffusionLM, prompt: list[int], cfg: SamplerConfig) -> list[int]:
    """Issue #6's naive reference sampler, at batch 1: the baseline of the speedup goal.

    Every step is a full forward over prompt and answer (no cache) with logits
    for every position; the block's masked positions with the highest
    confidence are committed (low-confidence remasking, LLaDA Alg. 4, Nie et
    al. 2025), ``ceil(masked / steps left)`` per step. Run it under
    :func:`_eager`: eager PyTorch ops, no graphs.
    """
    mcfg = model.config
    P, G, Tb = len(prompt), cfg.gen_length, cfg.block_length
    x = torch.tensor([prompt + [mcfg.mask_token_id] * G], device="cuda")  # (1, P + G)
    per_block = cfg.steps // (G // Tb)
    for lo in range(P, P + G, Tb):
        for s in range(per_block):
            logits = model(x).logits[0, lo:lo + Tb, : mcfg.vocab_size]  # (Tb, V) of (L, V)
            probs = F.softmax(logits.float(), dim=-1)
            confidence, pred = probs.max(-1)  # (Tb,)
            masked = x[0, lo:lo + Tb] == mcfg.mask_token_id
            k = -(-int(masked.sum()) // (per_block - s))
            top = torch.where(masked, confidence, -torch.inf).topk(k).indices
            x[0, lo + top] = pred[top]
    return x[0, P:].tolist()


def llada8b_rows(params: dict[str, Any], ctx: BenchContext) -> list[Row]:
    """Every LLaDA-8B-shape inference row of the issue's goals (see module doc)."""
    rows = kernel_rows(ctx, params["kernel_tokens"], params["w4a8_group_size"])
    rows += agreement_rows(ctx, params) + runtime_rows(ctx, params)
    P, G = params["llada8b_prompt_length"], params["llada8b_output_length"]
    steps, its = params["llada8b_steps"], params["llada8b_iterations"]
    model = llada8b(getattr(torch, params["llada8b_dtype"]))
    one = random_prompts(1, P, LLADA_8B.vocab_size)
    batch = random_prompts(8, P, LLADA_8B.vocab_size)
    naive = SamplerConfig(steps=steps, gen_length=G, block_length=params["naive_block_length"])
    ref_sampler, fast = Sampler(model), FastSampler(model)

    # Agreement on the 8B shape: the same fixed-step schedule without cache.
    ref_tokens = ref_sampler.generate(one, naive)
    rows.append(ctx.row("inference", "llada8b_agreement_pct{cache=none}",
                        agreement(fast.generate(one, naive), ref_tokens, G), "%",
                        note="bfloat16, random weights, fast path vs reference, same schedule"))
    with _eager():
        ref_ms = _time({"ref": partial(naive_generate, model, one[0], naive)}, its)["ref"]
    rows.append(ctx.row("inference", "llada8b_reference_p50_ms_b1", ref_ms, "ms",
                        note=f"naive (bench.gpu.naive_generate): full forward every step, logits "
                             f"for every position, block {params['naive_block_length']}, "
                             f"{steps} steps, bfloat16, eager ops, no graphs"))
    del ref_sampler, fast
    for quant in params["llada8b_precisions"]:
        if quant != "bf16":  # fresh bfloat16 weights, quantized
            del model
            torch.cuda.empty_cache()
            model = _quantized_8b(quant, getattr(torch, params["llada8b_dtype"]),
                                  params["w4a8_group_size"])
        torch.cuda.empty_cache()
        rows += _fast_path_rows(ctx, params, model, "" if quant == "bf16" else f"{quant}_",
                                one, batch, ref_ms)
    del model
    torch.cuda.empty_cache()
    return rows


def _quantized_8b(quant: str, dtype: torch.dtype, w4a8_group: int) -> DiffusionLM:
    """The 8B shape (random weights) in precision ``quant`` of ``bench.toml``'s
    ``llada8b_precisions``: w4 (int4 linears and embedding, group 32), fp8 (linears)
    or w4a8 (int4 in groups of ``w4a8_group``, int8 activations; int4 embedding)."""
    if quant == "w4":
        return quantize_model(llada8b(dtype), "int4", embedding=True)
    if quant == "w4a8":
        return quantize_model(llada8b(dtype), "w4a8", group_size=w4a8_group, embedding=True)
    if quant == "fp8":
        return quantize_model(llada8b(dtype), "fp8")
    raise ValueError(f"unknown 8B precision {quant!r}; expected bf16, w4, fp8 or w4a8")


def _fast_path_rows(ctx: BenchContext, params: dict[str, Any], model: DiffusionLM, tag: str,
                    one: list[list[int]], batch: list[list[int]], ref_ms: float) -> list[Row]:
    """The 8B shape's fast-path rows of one precision (``tag``: row-name prefix)."""
    G, steps = params["llada8b_output_length"], params["llada8b_steps"]
    its = params["llada8b_iterations"]
    fast = FastSampler(model)
    rows: list[Row] = []
    # 8 steps at batch 1 for each cache mode and block length; the fastest is the headline.
    per_variant: dict[tuple[CacheMode, int], float] = {}
    for cache in params["llada8b_caches"]:
        for block in params["llada8b_block_lengths"]:
            cfg = SamplerConfig(steps=steps, gen_length=G, block_length=block, cache=cache)
            ms = _time({"fast": partial(fast.generate, one, cfg)}, its)["fast"]
            per_variant[cache, block] = ms
            rows.append(ctx.row("inference",
                                f"llada8b_{tag}p50_ms{{B=1,cache={cache},block={block}}}",
                                ms, "ms", note=f"{steps} steps, CUDA graphs"))
    cache, block = min(per_variant, key=lambda v: per_variant[v])
    cfg = SamplerConfig(steps=steps, gen_length=G, block_length=block, cache=cache)
    what = f"fast path, {cache} cache, block {block}, {steps} steps, CUDA graphs"
    for B, prompts in ((1, one), (8, batch)):
        rows += _latency(ctx, f"llada8b_{tag}", partial(fast.generate, prompts, cfg), its,
                         B, G)
        for r in rows[-4:]:
            r.note = what
    p50 = next(r.value for r in rows if r.name == f"llada8b_{tag}latency_p50_ms_b1")
    rows.append(ctx.row("inference", f"llada8b_{tag}speedup_b1", ref_ms / p50, "x",
                        note="naive reference p50 / fast p50 (B=1, 8 steps), same run"))
    rows.append(ctx.row("inference", f"llada8b_{tag}eager_elementwise_p50_ms_b1",
                        _eager_ms(partial(FastSampler(model).generate, one, cfg), its), "ms",
                        note=f"{what}; RMSNorm/RoPE/SwiGLU as eager ops, not fused kernels"))
    long = SamplerConfig(steps=params["long_steps"], gen_length=G,
                         block_length=params["long_block_length"],
                         cache=params["long_cache"], threshold=params["threshold"])
    long_ms = _time({"fast": partial(fast.generate, one, long)}, its)["fast"]
    rows.append(ctx.row("inference", f"llada8b_{tag}p50_ms_{params['long_steps']}steps",
                        long_ms, "ms",
                        note=f"B=1, {params['long_cache']} cache, threshold "
                             f"{params['threshold']}, block {params['long_block_length']}; "
                             f"{fast.forwards} steps run (random weights: the threshold "
                             "rarely fires)"))
    for suffix in params["suffixes"]:  # DPad windows: same schedules, fewer masks seen
        cut = dataclasses.replace(cfg, suffix=suffix)
        # a sampler each: one keeps the graphs of one problem shape only
        t = _time({"full": partial(FastSampler(model).generate, one, cfg),
                   "cut": partial(FastSampler(model).generate, one, cut),
                   "long": partial(FastSampler(model).generate, one,
                                   dataclasses.replace(long, suffix=suffix)),
                   "cut8": partial(FastSampler(model).generate, batch, cut)}, its)
        label = f"suffix={suffix}"
        rows += [ctx.row("inference", f"llada8b_{tag}latency_p50_ms_b1{{{label}}}", t["cut"],
                         "ms", note=f"{what}, {suffix} masks after the block"),
                 ctx.row("inference", f"llada8b_{tag}suffix_speedup_b1{{{label}}}",
                         t["full"] / t["cut"], "x",
                         note="full suffix p50 / window p50 (B=1), interleaved, same run"),
                 ctx.row("inference", f"llada8b_{tag}speedup_b1{{{label}}}", ref_ms / t["cut"],
                         "x", note="naive reference p50 / window p50 (B=1, 8 steps), same run"),
                 ctx.row("inference", f"llada8b_{tag}tokens_per_s_b8{{{label}}}",
                         8 * G / t["cut8"] * 1e3, "tok/s", note=f"{what}, B=8"),
                 ctx.row("inference",
                         f"llada8b_{tag}p50_ms_{params['long_steps']}steps{{{label}}}",
                         t["long"], "ms", note=f"as the {params['long_steps']}-step row")]
    return rows


def llada8b_w4_peak(model: DiffusionLM, prompt_length: int, output_length: int,
                    steps: int, block_length: int, cache: CacheMode) -> tuple[int, int]:
    """Bytes allocated before, and at the peak of, the fast path's first generation."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    prompts = random_prompts(1, prompt_length, model.config.vocab_size)
    FastSampler(model).generate(prompts, SamplerConfig(steps=steps, gen_length=output_length,
                                                       block_length=block_length, cache=cache))
    return before, int(torch.cuda.max_memory_allocated())


if __name__ == "__main__":  # bench.memory: W4 weights, allocated before and peak, fresh process
    spec = json.loads(sys.argv[1])
    w4 = _quantized_8b(spec["precision"], torch.bfloat16, spec["w4a8_group_size"])
    before, peak = llada8b_w4_peak(w4, spec["llada8b_prompt_length"],
                                   spec["llada8b_output_length"], spec["llada8b_steps"],
                                   spec["llada8b_block_length"], spec["llada8b_cache"])
    print(weight_bytes(w4), before, peak)
