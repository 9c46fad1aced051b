"""Inference: latency percentiles and throughput, and the fast path against the reference.

Latency is end to end (prompt in, every answer position decided), timed with
``perf_counter`` after ``torch.cuda.synchronize`` on CUDA; throughput is
``batch * output_length / median latency`` (seed 002's T_gen). Variants that
are compared (reference vs fast path) run interleaved, one call of each per
iteration, so drift on a shared machine hits both alike.

With ``--device cuda`` the LLaDA-8B shape (random weights, bfloat16 and int4)
is checked and timed too by :mod:`bench.gpu`, reference against the GPU fast
path: the seed's GPU targets are for a model of that size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bench.common import BenchContext, Row, percentile
from bench.quality import heldout_prompts
from ruvdllm.config import ModelConfig
from ruvdllm.model import DiffusionLM
from ruvdllm.runtime import load
from ruvdllm.sampler import Sampler, SamplerConfig
from ruvdllm.tokenizer import Tokenizer

LLADA_8B = ModelConfig(d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32,
                       mlp_hidden_size=12288, vocab_size=126464, embedding_size=126464,
                       mask_token_id=126336, eos_token_id=126081, pad_token_id=126081,
                       bos_token_id=126080, rope_theta=500000.0, max_sequence_length=4096)


def measure(fns: dict[str, Callable[[], object]], iterations: int, warmup: int, device: str,
            desc: str = "") -> dict[str, list[float]]:
    """Seconds per call of each function, interleaved, after ``warmup`` untimed rounds."""
    def once(fn: Callable[[], object]) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in tqdm(range(warmup + iterations), desc=desc, leave=False, disable=not desc):
        for name, fn in fns.items():
            dt = once(fn)
            if i >= warmup:
                times[name].append(dt)
    return times


def llada8b(dtype: torch.dtype) -> DiffusionLM:
    """The LLaDA-8B shape with random weights on CUDA (no download needed)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda"):  # a copy: quantize_model records its scheme in the config
            model = DiffusionLM(dataclasses.replace(LLADA_8B))
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def random_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Token prompts for models with random weights, where content carries no meaning."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab - 512, (batch, length), generator=gen).tolist()


PROMPTS_ENV = "RUVDLLM_BENCH_PROMPTS"


def bench_prompts(tokenizer: Tokenizer, n: int, length: int) -> list[list[int]]:
    """``n`` held-out test prompts of ``length`` tokens (:func:`bench.quality.heldout_prompts`).

    Where the corpora are not installed (the GPU machine's image), the file named
    by ``$RUVDLLM_BENCH_PROMPTS`` is read instead: JSON ``{length: [[ids]...]}``
    written where they are by ``python -m bench.inference FILE``.
    """
    saved = os.environ.get(PROMPTS_ENV)
    if saved:
        table = json.loads(Path(saved).read_text())
        if str(length) not in table or len(table[str(length)]) < n:
            raise ValueError(f"{saved} holds no {n} prompts of {length} tokens")
        return [list(p) for p in table[str(length)][:n]]
    return [p for p, _ in heldout_prompts(tokenizer, n, length, 0)]


def latency_rows(ctx: BenchContext, prefix: str, seconds: list[float], batch: int,
                 tokens: int) -> list[Row]:
    """p50/p90/p99 latency and tokens/s rows, names suffixed with the batch size."""
    ms = [s * 1e3 for s in seconds]
    p50 = percentile(ms, 50)
    return [ctx.row("inference", f"{prefix}latency_p50_ms_b{batch}", p50, "ms"),
            ctx.row("inference", f"{prefix}latency_p90_ms_b{batch}", percentile(ms, 90), "ms"),
            ctx.row("inference", f"{prefix}latency_p99_ms_b{batch}", percentile(ms, 99), "ms"),
            ctx.row("inference", f"{prefix}tokens_per_s_b{batch}", batch * tokens / p50 * 1e3,
                    "tok/s")]


def run(params: dict[str, Any], ctx: BenchContext) -> list[Row]:
    rt = load(params["model"], device=ctx.device)
    sampler = Sampler(rt.model)
    P, G = params["prompt_length"], params["output_length"]
    batches: list[int] = params["batch_sizes"]
    prompts = bench_prompts(rt.tokenizer, max(batches), P)
    cfg = SamplerConfig(steps=params["steps"], gen_length=G,
                        block_length=params["block_length"], cache=params["cache"])
    rows: list[Row] = []
    for B in batches:
        t = measure({"gen": partial(sampler.generate, prompts[:B], cfg)},
                    params["iterations"], params["warmup"], ctx.device, f"inference B={B}")
        rows += latency_rows(ctx, "", t["gen"], B, G)

    cG = params["compare_output_length"]
    ref = SamplerConfig(steps=params["compare_steps"], gen_length=cG,
                        block_length=params["compare_block_length"])
    fast = SamplerConfig(steps=params["compare_steps"], gen_length=cG,
                         block_length=params["compare_block_length"], cache="dual",
                         threshold=params["compare_threshold"])
    one = [prompts[0]]
    t = measure({"ref": lambda: sampler.generate(one, ref),
                 "fast": lambda: sampler.generate(one, fast)},
                params["compare_iterations"], 1, ctx.device, "reference vs fast")
    ref_ms, fast_ms = percentile(t["ref"], 50) * 1e3, percentile(t["fast"], 50) * 1e3
    what = f"B=1, {cG} tokens, {params['compare_steps']} steps"
    rows += [ctx.row("inference", "reference_p50_ms", ref_ms, "ms",
                     note=f"{what}, no cache, no threshold"),
             ctx.row("inference", "fast_p50_ms", fast_ms, "ms",
                     note=f"{what}, dual cache, threshold {params['compare_threshold']}"),
             ctx.row("inference", "fast_path_speedup", ref_ms / fast_ms, "x",
                     note="reference p50 / fast p50, same run")]
    return rows + _llada8b_rows(params, ctx)


def _llada8b_rows(params: dict[str, Any], ctx: BenchContext) -> list[Row]:
    if ctx.device == "cuda":
        from bench.gpu import llada8b_rows  # imports this module

        return llada8b_rows(params, ctx)
    names = ["llada8b_reference_p50_ms_b1", "llada8b_latency_p50_ms_b1",
             "llada8b_tokens_per_s_b8"]
    for tag in ("w4", "fp8", "w4a8"):
        names += [f"llada8b_{tag}_latency_p50_ms_b1", f"llada8b_{tag}_tokens_per_s_b8",
                  f"llada8b_{tag}_speedup_b1", f"llada8b_{tag}_p50_ms_{params['long_steps']}steps"]
    return [Row("inference", n, float("nan"), "", note="not measured on cpu (LLaDA-8B "
                "shape runs with --device cuda)") for n in names]


if __name__ == "__main__":  # save held-out prompts for a machine without the corpora
    tok = load("default", device="cpu").tokenizer
    Path(sys.argv[1]).write_text(json.dumps({n: [p for p, _ in heldout_prompts(tok, 8, n, 0)]
                                             for n in (64, 128)}))
