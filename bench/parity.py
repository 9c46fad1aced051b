"""Parity: seed 002's methodology on our own pair, the default model against its AR twin.

Both models share data, training budget and shape; the AR twin ships int8, so
the diffusion model is quantized to the same scheme (``quant``) and precision
is a control variable, as seed 002 asks. The diffusion model decodes with the
project's sampler at a fixed step count ``K`` (no confidence threshold, so K
is exactly the number of denoising steps; ``cache`` as configured); the AR
twin decodes greedily with a KV cache (:func:`ar_decode`). Both produce
exactly ``output_length`` tokens (no EOS stop) when timed.

Measured, over K x batch at ``output_length`` and over ``lengths`` at
``length_steps``: end-to-end latency (median), throughput ``B * G / L_e2e``,
the AR twin's inter-token latency, and peak memory (RSS growth of a fresh
process on CPU, ``torch.cuda.max_memory_allocated`` on CUDA; it does not depend
on K, each step being the same forward, so it is measured over lengths at batch 1
and over batches at ``output_length``).

Quality (fixed): mean sentence chrF (bench.quality.chrf) of greedy
continuations of held-out test documents of the base domains against the true
continuation, both cut at the first EOS. ``S_parity`` is the fewest steps whose
chrF reaches the AR twin's; the speedup at parity is ``L_e2e(AR) / L_e2e(K =
S_parity)`` at the same batch and length. When no K reaches parity, both are
reported as not reached.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

from tqdm import tqdm

from bench.common import BenchContext, Row, percentile
from bench.inference import measure
from bench.memory import generation_peak_mb
from bench.quality import chrf, heldout_prompts
from bench.report import labelled
from ruvdllm.ar import ar_generate
from ruvdllm.model import DiffusionLM
from ruvdllm.runtime import Runtime, load
from ruvdllm.sampler import Sampler, SamplerConfig


def cut_at_eos(tokens: list[int], eos_id: int) -> list[int]:
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens


def ar_decode(model: DiffusionLM, prompts: list[list[int]], gen_length: int) -> list[list[int]]:
    """The AR twin's greedy KV-cached decoding, exactly ``gen_length`` tokens per prompt."""
    return ar_generate(model, prompts, gen_length, stop_at_eos=False)


def _diffusion_cfg(params: dict[str, Any], steps: int, length: int) -> SamplerConfig:
    return SamplerConfig(steps=steps, gen_length=length,
                         block_length=min(params["block_length"], length), cache=params["cache"])


def _models(params: dict[str, Any], device: str) -> tuple[Runtime, Runtime]:
    ar = load(params["ar"], device=device)
    scheme = (ar.model.config.quantization or {}).get("scheme", "none")
    if scheme != params["quant"]:
        raise ValueError(f"parity: quant = {params['quant']!r} but the AR twin "
                         f"{params['ar']!r} is {scheme!r}; precision must match")
    return load(params["diffusion"], device=device, quant=params["quant"]), ar


def _timing_rows(ctx: BenchContext, diff: Runtime, ar: Runtime, prompts: list[list[int]],
                 params: dict[str, Any], ks: list[int], G: int, batch: int,
                 prefix: str) -> tuple[list[Row], dict[str, float]]:
    """Interleaved timings of diffusion at each K and the AR twin; rows and p50 ms."""
    sampler, p = Sampler(diff.model), prompts[:batch]
    fns: dict[str, Callable[[], object]] = {
        f"K={k}": partial(sampler.generate, p, _diffusion_cfg(params, k, G)) for k in ks}
    fns["ar"] = partial(ar_decode, ar.model, p, G)
    fns["ar_prefill"] = partial(ar_decode, ar.model, p, 1)
    t = measure(fns, params["iterations"], params["warmup"], ctx.device,
                f"parity {prefix or 'grid'} B={batch} G={G}")
    p50 = {name: percentile(v, 50) * 1e3 for name, v in t.items()}
    rows = []
    for k in ks:
        lab = {"model": "diffusion", "K": k, "B": batch, "G": G}
        rows.append(ctx.row("parity", labelled(f"{prefix}e2e_ms", **lab), p50[f"K={k}"], "ms"))
        if not prefix:
            rows.append(ctx.row("parity", labelled("tokens_per_s", **lab),
                                batch * G / p50[f"K={k}"] * 1e3, "tok/s"))
    lab = {"model": "ar", "B": batch, "G": G}
    rows.append(ctx.row("parity", labelled(f"{prefix}e2e_ms", **lab), p50["ar"], "ms"))
    if not prefix:
        rows += [ctx.row("parity", labelled("tokens_per_s", **lab), batch * G / p50["ar"] * 1e3,
                         "tok/s"),
                 ctx.row("parity", labelled("itl_ms", **lab),
                         (p50["ar"] - p50["ar_prefill"]) / max(G - 1, 1), "ms",
                         note="(L_e2e - L_prefill) / (N - 1)")]
    return rows, p50


def _quality(params: dict[str, Any], diff: Runtime, ar: Runtime, ks: list[int],
             G: int) -> tuple[dict[int, float], float, dict[str, float]]:
    """Mean chrF on the held-out prompts: diffusion at each K, the AR twin, and diffusion
    at ``cache_quality_steps`` under each cache mode of ``cache_quality``."""
    tok = diff.tokenizer
    pairs = heldout_prompts(tok, params["quality_prompts"], params["prompt_length"], G,
                            tuple(params["quality_domains"]))
    prompts = [p for p, _ in pairs]
    refs = [tok.decode(cut_at_eos(c, tok.eos_token_id)) for _, c in pairs]

    def score(outputs: list[list[int]]) -> float:
        texts = [tok.decode(cut_at_eos(o, tok.eos_token_id)) for o in outputs]
        return sum(chrf(h, r) for h, r in zip(texts, refs, strict=True)) / len(refs)

    sampler = Sampler(diff.model)
    diff_scores = {k: score(sampler.generate(prompts, _diffusion_cfg(params, k, G)))
                   for k in tqdm(ks, desc="parity quality", leave=False)}
    fixed = _diffusion_cfg(params, params["cache_quality_steps"], G)
    cache_scores = {cache: score(sampler.generate(prompts, replace(fixed, cache=cache)))
                    for cache in params["cache_quality"]}
    return diff_scores, score(ar_decode(ar.model, prompts, G)), cache_scores


def _memory_rows(ctx: BenchContext, params: dict[str, Any], batches: list[int]) -> list[Row]:
    """Peak memory over ``lengths`` at batch 1, and over ``batches`` at ``output_length``."""
    cells = dict.fromkeys([(1, G) for G in params["lengths"]] +
                          [(B, params["output_length"]) for B in batches])
    rows = []
    for B, G in tqdm(cells, desc="parity memory", leave=False):
        for model in ("diffusion", "ar"):
            spec = {"model": params[model], "quant": "none" if model == "ar"
                    else params["quant"], "ar": model == "ar",
                    "prompt_length": params["prompt_length"], "output_length": G,
                    "steps": params["length_steps"],
                    "block_length": min(params["block_length"], G),
                    "cache": params["cache"], "batch": B}
            peak = generation_peak_mb(spec, ctx.device)
            rows.append(ctx.row("parity", labelled("peak_mb", model=model, B=B, G=G), peak,
                                "MB"))
    return rows


def run(params: dict[str, Any], ctx: BenchContext) -> list[Row]:
    diff, ar = _models(params, ctx.device)
    ks: list[int] = params["steps"]
    batches: list[int] = params["batch_sizes"]
    G = params["output_length"]
    prompts = [p for p, _ in heldout_prompts(diff.tokenizer, max(batches),
                                             params["prompt_length"], 0)]
    rows: list[Row] = []
    p50: dict[int, dict[str, float]] = {}
    for B in batches:
        grid, p50[B] = _timing_rows(ctx, diff, ar, prompts, params, ks, G, B, "")
        rows += grid
    for length in params["lengths"]:
        for B in batches:
            rows += _timing_rows(ctx, diff, ar, prompts, params, [params["length_steps"]],
                                 length, B, "length_")[0]
    rows += _memory_rows(ctx, params, batches)

    diff_q, ar_q, cache_q = _quality(params, diff, ar, ks, G)
    rows += [ctx.row("parity", labelled("chrf", model="diffusion", K=k), q, "chrF")
             for k, q in diff_q.items()]
    K = params["cache_quality_steps"]
    rows += [ctx.row("parity", labelled("chrf", model="diffusion", K=K, cache=cache), q, "chrF",
                     note=f"what each cache mode costs in quality (issue #6): {K} steps, "
                          f"same prompts and metric, {params['quant']} weights")
             for cache, q in cache_q.items()]
    rows.append(ctx.row("parity", labelled("chrf", model="ar"), ar_q, "chrF"))
    reached = [k for k in sorted(diff_q) if diff_q[k] >= ar_q]
    metric = (f"chrF on {params['quality_prompts']} held-out continuations of {G} tokens; "
              f"AR twin {ar_q:.2f}")
    if not reached:
        missing = f"not reached within K <= {max(ks)} ({metric}, best diffusion " \
                  f"{max(diff_q.values()):.2f})"
        rows.append(Row("parity", "s_parity", math.nan, "steps", note=missing))
        rows += [Row("parity", f"speedup_at_parity{'' if B == 1 else f'_b{B}'}", math.nan, "x",
                     note=missing) for B in batches]
        return rows
    s = reached[0]
    rows.append(ctx.row("parity", "s_parity", s, "steps", note=metric))
    rows += [ctx.row("parity", f"speedup_at_parity{'' if B == 1 else f'_b{B}'}",
                     p50[B]["ar"] / p50[B][f"K={s}"], "x",
                     note=f"L_e2e(AR) / L_e2e(diffusion, K={s}), B={B}, G={G}")
             for B in batches]
    return rows
