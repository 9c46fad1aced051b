"""Memory: weight bytes, load and peak generation memory, float against int8/int4.

On CPU a measurement runs in a fresh process (``python -m bench.memory SPEC``):
after its imports it resets the kernel's peak-RSS mark (``/proc/self/clear_refs``),
loads the model and generates once, and reports VmRSS growth after loading and
VmHWM growth over the whole run. A fresh process per figure keeps the
allocator's cached pages of earlier work out of it; tracemalloc would miss
torch's allocations. On CUDA the same workload runs in-process between
``reset_peak_memory_stats`` and ``max_memory_allocated``; the LLaDA-8B int4
figure is the GPU fast path's (:mod:`bench.gpu`).

The seed's memory targets are for a 7B int4 model: with ``--device cuda`` they
are measured on the LLaDA-8B shape (random weights, int4); on CPU they are
reported as not measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bench.common import BenchContext, Row
from bench.inference import llada8b, random_prompts
from ruvdllm.ar import ar_generate
from ruvdllm.quant import quantize_model, weight_bytes
from ruvdllm.runtime import load
from ruvdllm.sampler import Sampler, SamplerConfig

MB = 1e6
_STATUS = Path("/proc/self/status")


def _status_kb(key: str) -> int:
    line = next(x for x in _STATUS.read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1])


def _generate(spec: dict[str, Any], device: str) -> None:
    """Load the model of ``spec`` and generate once; returns nothing (memory is the point)."""
    rt = load(spec["model"], device=device,
              quant=None if spec["quant"] == "none" else spec["quant"])
    prompts = random_prompts(spec["batch"], spec["prompt_length"], rt.model.config.vocab_size)
    if spec["ar"]:
        ar_generate(rt.model, prompts, spec["output_length"], stop_at_eos=False)
    else:
        Sampler(rt.model).generate(prompts, SamplerConfig(
            steps=spec["steps"], gen_length=spec["output_length"],
            block_length=spec["block_length"], cache=spec["cache"]))


def _worker(spec: dict[str, Any]) -> float:
    """Peak RSS growth (MB) of this process over the workload, after imports."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _status_kb("VmRSS")
    _generate(spec, "cpu")
    return (_status_kb("VmHWM") - base) * 1e3 / MB


def generation_peak_mb(spec: dict[str, Any], device: str) -> float:
    """Peak memory growth (MB) of loading ``spec['model']`` and generating once.

    ``spec``: model, quant, ar, prompt_length, output_length, steps,
    block_length, cache, batch.
    """
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _generate(spec, device)
        return (torch.cuda.max_memory_allocated() - base) / MB
    out = subprocess.run([sys.executable, "-m", "bench.memory", json.dumps(spec)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def run(params: dict[str, Any], ctx: BenchContext) -> list[Row]:
    rows: list[Row] = []
    peaks: dict[tuple[str, int], float] = {}
    for quant in tqdm(params["quants"], desc="memory", leave=False):
        rt = load(params["model"], device="cpu", quant=None if quant == "none" else quant)
        rows.append(ctx.row("memory", f"weights_mb_{quant}", weight_bytes(rt.model) / MB, "MB"))
        for B in params["batch_sizes"]:
            spec = {"model": params["model"], "quant": quant, "ar": False, "batch": B,
                    **{k: params[k] for k in ("prompt_length", "output_length", "steps",
                                              "block_length")}, "cache": "dual"}
            peaks[quant, B] = generation_peak_mb(spec, ctx.device)
            rows.append(ctx.row("memory", f"{quant}_total_mb_b{B}", peaks[quant, B], "MB",
                                note="peak growth over load + generate"))
    return rows + _llada8b_rows(params, ctx)


def _llada8b_rows(params: dict[str, Any], ctx: BenchContext) -> list[Row]:
    precisions = {"int4": "w4", "w4a8": "w4a8"}  # row prefix: bench.gpu's precision
    names = {**{f"llada8b_{p}_{what}_gb": "GB" for p in precisions
                for what in ("weights", "total")}, "llada8b_kv_cache_gb": "GB"}
    if ctx.device != "cuda":
        return [Row("memory", n, float("nan"), u, note="not measured on cpu (LLaDA-8B int4 "
                    "runs with --device cuda)") for n, u in names.items()]
    G = params["llada8b_output_length"]
    rows: list[Row] = []
    for prefix, precision in precisions.items():
        # A fresh process: what earlier sections left allocated stays out of the peak.
        spec = {k: params[k] for k in ("llada8b_prompt_length", "llada8b_output_length",
                                       "llada8b_steps", "llada8b_block_length",
                                       "llada8b_cache", "w4a8_group_size")}
        out = subprocess.run([sys.executable, "-m", "bench.gpu",
                              json.dumps({**spec, "precision": precision})],
                             capture_output=True, text=True, check=True)
        weights, before, total = map(int, out.stdout.split()[-3:])
        what = ("int4 linears (group 32) and embedding" if precision == "w4" else
                f"int4 linears (group {params['w4a8_group_size']}, int8 activations) "
                "and int4 embedding")
        rows += [ctx.row("memory", f"llada8b_{prefix}_weights_gb", weights / 1e9, "GB",
                         note=what),
                 ctx.row("memory", f"llada8b_{prefix}_total_gb", total / 1e9, "GB",
                         note=f"peak allocated, weights included ({what}, bfloat16 scales), "
                              f"fast path ({params['llada8b_cache']} cache, block "
                              f"{params['llada8b_block_length']}, CUDA graphs, Triton "
                              f"autotuning), B=1, {params['llada8b_prompt_length']}+{G} "
                              f"tokens, a fresh process; allocated before generating: "
                              f"{before / 1e9:.2f} GB")]
    model = quantize_model(llada8b(torch.bfloat16), "int4", embedding=True)
    ctx_ids = torch.tensor(random_prompts(1, params["llada8b_context"], model.config.vocab_size),
                           device="cuda")
    with torch.no_grad():
        cache = model(ctx_ids, return_cache=True, logits_slice=slice(-1, None)).cache
    assert cache is not None
    kv = sum(t.nbytes for t in [*cache.keys, *cache.values])
    del model, cache
    torch.cuda.empty_cache()
    ctxlen = params["llada8b_context"]
    return [*rows, ctx.row("memory", "llada8b_kv_cache_gb", kv / 1e9, "GB",
                           note=f"bfloat16 keys+values of {ctxlen} tokens")]


if __name__ == "__main__":
    print(_worker(json.loads(sys.argv[1])))
