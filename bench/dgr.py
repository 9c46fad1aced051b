"""DGR and TALoRA on a node: cost per denoising step, and quality on held-out domains.

**Overhead.** The default model with a TALoRA bank (three global adapters and
``patterns`` local patterns per bank) generates the same prompts at the same
steps with DGR off and on, alternating, ``repeats`` times; the figure is the
median time per denoising step.

**Held-out perplexity.** The node learns local patterns: for every domain of
``pattern_domains`` and every bank, :func:`ruvdllm.learn.train_bank` on the
domain's train split, stored under the embedding of that text. Then each test
window (``seq_len`` tokens, the first ``prompt_len`` clean) is scored with the
masked-diffusion ELBO over its answer, ``samples`` stratified ``t`` per window
visited from high to low ``t`` as in decoding, so all variants make the same
forwards:

* ``base``: no adapter;
* ``talora``: the bank mix at each ``t``, patterns retrieved by the prompt's
  embedding (one extra forward over the prompt, also made by ``dgr``);
* ``dgr``: as ``talora``, but after each forward the hidden state of the
  uncertain masked positions becomes the query for the next one.

**Infilling.** Greedy generation of the ``gen_length`` tokens after each prompt
(TALoRA on), DGR re-masking off and on: exact-token accuracy against the text.

Params (defaults in DEFAULTS): ``parts`` (overhead, quality), ``data`` (a
corpus export folder, for machines without the corpus packages), ``quant``
(the node's int8 by default), ``dgr`` (DGRConfig fields).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bench.common import BenchContext, Row
from ruvdllm.corpus import documents, read_export
from ruvdllm.dgr import DGRConfig, DGRHook, uncertainty
from ruvdllm.evaluate import windows
from ruvdllm.learn import prompt_embedding, train_bank
from ruvdllm.lora import LoRAConfig, LoRAModel, frozen_a, zero_b
from ruvdllm.runtime import Runtime, load
from ruvdllm.sampler import Sampler, SamplerConfig
from ruvdllm.talora import BANKS, TALoRA, TALoRAHook
from ruvdllm.train import token_stream

DEFAULTS: dict[str, Any] = {
    "model": "default", "quant": "int8", "seed": 0, "data": "",
    "parts": ["overhead", "quality"],
    # overhead
    "prompts": 4, "prompt_len": 64, "gen_length": 64, "block_length": 32, "steps": 32,
    "patterns": 8, "repeats": 5,
    # quality
    "pattern_domains": ["pydocs", "kerneldocs", "wiki"], "eval_domains": ["pydocs"],
    "train_docs": 400, "train_steps": 150, "train_lr": 3e-3, "train_batch": 8,
    "train_seq_len": 128, "eval_tokens": 16384, "seq_len": 128, "samples": 8,
    "infill_prompts": 24, "infill_gen": 32,
    "dgr": {"uncertain_threshold": 0.5, "remask_threshold": 0.05, "max_remask": 1},
}


def _docs(p: dict[str, Any], domain: str, split: str) -> list[str]:
    """A domain's split from the installed packages, or from the export folder ``data``."""
    return read_export(p["data"], domain, split) if p["data"] else documents(domain, split)


def _dgr_config(p: dict[str, Any], **over: Any) -> DGRConfig:
    return DGRConfig(**{**p["dgr"], **over})


def _random_adapter(rt: Runtime, cfg: LoRAConfig, seed: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    b = {k: 0.01 * torch.randn(v.shape, generator=gen) for k, v in zero_b(rt.model, cfg).items()}
    return {**frozen_a(rt.model, cfg, seed), **b}


def overhead(rt: Runtime, p: dict[str, Any]) -> dict[str, float]:
    """Median ms per denoising step with DGR off and on (same prompts, steps, bank)."""
    cfg = LoRAConfig()
    d = rt.model.config.d_model
    bank = TALoRA(None, d, cfg)
    rng = np.random.default_rng(p["seed"])
    for i, name in enumerate(BANKS):
        bank.set_global(name, _random_adapter(rt, cfg, i), 1)
        for j in range(p["patterns"]):
            bank.store(_random_adapter(rt, cfg, 100 * i + j), rng.standard_normal(d),
                       {"bank": name})
    lm = LoRAModel(rt.model, cfg)
    texts = _docs(p, "pydocs", "test")[: p["prompts"]]
    prompts = [rt.tokenizer.encode(t, add_bos=True)[: p["prompt_len"]] for t in texts]
    query = prompt_embedding(rt.model, rt.tokenizer, texts)
    th = TALoRAHook(bank, lm, query=query)
    dgr = DGRHook(_dgr_config(p), talora_hook=th)
    sampler = Sampler(rt.model, [th, dgr])
    scfg = SamplerConfig(steps=p["steps"], gen_length=p["gen_length"],
                         block_length=p["block_length"])
    times: dict[bool, list[float]] = {False: [], True: []}
    for rep in range(p["repeats"] + 1):  # the first round warms up
        for on in (False, True):
            dgr.enabled, th.query = on, query
            t0 = time.perf_counter()
            sampler.generate(prompts, scfg)
            if rep:
                times[on].append((time.perf_counter() - t0) / p["steps"] * 1e3)
    lm.detach()
    off, with_dgr = statistics.median(times[False]), statistics.median(times[True])
    return {"step_ms_off": off, "step_ms_on": with_dgr,
            "overhead_pct": 100 * (with_dgr - off) / off}


def learn_patterns(rt: Runtime, p: dict[str, Any], cfg: LoRAConfig) -> TALoRA:
    """Local patterns of every pattern domain and bank, keyed by the domain's text."""
    bank = TALoRA(None, rt.model.config.d_model, cfg)
    for domain in p["pattern_domains"]:
        texts = _docs(p, domain, "train")[: p["train_docs"]]
        key = prompt_embedding(rt.model, rt.tokenizer, texts)
        for name in BANKS:
            adapter, metrics = train_bank(rt.model, rt.tokenizer, texts, name, lora=cfg,
                                          steps=p["train_steps"], lr=p["train_lr"],
                                          seq_len=p["train_seq_len"],
                                          batch_size=p["train_batch"], seed=p["seed"])
            bank.store(adapter, key, {"bank": name, "domain": domain, **metrics})
    return bank


@torch.no_grad()
def answer_nll(rt: Runtime, x0: Tensor, p: dict[str, Any], variant: str,
               th: TALoRAHook) -> tuple[float, float]:
    """ELBO NLL per answer token and the share of forwards that used a pattern of the domain.

    ``x0`` ``(N, L)`` windows; ``variant`` is base, talora or dgr (see module doc).
    """
    model, P = rt.model, p["prompt_len"]
    dev = next(model.parameters()).device
    mask_id, V = model.config.mask_token_id, model.config.vocab_size
    gen = torch.Generator().manual_seed(p["seed"])
    th.lora_model.set_mix([])
    out = model(x0[:, :P].to(dev), return_hidden=True, logits_slice=slice(0, 0))
    queries = out.hidden.float().mean(1).cpu().numpy()  # (N, d) prompt embeddings
    cfg = _dgr_config(p)
    total, count, own, forwards = 0.0, 0, 0, 0
    K = p["samples"]
    for n in range(len(x0)):
        ts = ((torch.arange(K) + torch.rand(K, generator=gen)) / K).clamp(min=1e-3)
        noise = torch.rand(x0.shape[1], generator=gen)
        th.query = queries[n]
        for t in ts.flip(0).tolist():  # high t first, as the sampler visits them
            x = x0[n:n + 1].to(dev)
            masked = (noise.to(dev) < t)[None] & (torch.arange(x.shape[1], device=dev) >= P)
            if variant == "base":
                th.lora_model.set_mix([])
            else:
                mix = th.apply(t)
                own += any(name.startswith("local:") for name, _ in mix)
            res = model(torch.where(masked, mask_id, x), return_hidden=True)
            logits = res.logits[..., :V]
            nll = F.cross_entropy(logits.float().transpose(1, 2), x, reduction="none")
            total += float((nll * masked).sum()) / t
            count += x.shape[1] - P
            forwards += 1
            if variant == "dgr":
                unsure = masked & (uncertainty(logits, cfg.measure) > cfg.uncertain_threshold)
                if bool(unsure.any()):
                    th.query = res.hidden[unsure].float().mean(0).cpu().numpy()
    th.lora_model.set_mix([])
    return total / count, own / forwards


@torch.no_grad()
def infill_accuracy(rt: Runtime, x0: Tensor, p: dict[str, Any], th: TALoRAHook,
                    dgr: DGRHook) -> float:
    """Exact-token accuracy of greedy infilling of the ``infill_gen`` tokens after prompts."""
    P, G = p["prompt_len"], p["infill_gen"]
    sampler = Sampler(rt.model, [th, dgr])
    scfg = SamplerConfig(steps=G, gen_length=G, block_length=G)
    hits = 0
    rows = x0[: p["infill_prompts"]]
    th.lora_model.set_mix([])
    dev = next(rt.model.parameters()).device
    emb = rt.model(rows[:, :P].to(dev), return_hidden=True, logits_slice=slice(0, 0)).hidden
    for row, q in zip(rows, emb.float().mean(1).cpu().numpy(), strict=True):
        th.query = q
        answer = sampler.generate([row[:P].tolist()], scfg)[0]
        ref = row[P:P + G].tolist()
        hits += sum(a == b for a, b in zip(answer, ref, strict=False))
    th.lora_model.set_mix([])
    return hits / (len(rows) * G)


def run(params: dict[str, Any], ctx: BenchContext) -> list[Row]:
    p = {**DEFAULTS, **params, "dgr": {**DEFAULTS["dgr"], **params.get("dgr", {})}}
    torch.manual_seed(p["seed"])
    rt = load(p["model"], device=ctx.device, quant=p["quant"])
    note = (f"{p['model']} {p['quant']}, {p['prompts']} prompts x {p['gen_length']} tokens, "
            f"{p['steps']} steps, median of {p['repeats']}")
    rows = []
    if "overhead" in p["parts"]:
        rows += [ctx.row("dgr", name, value, "%" if name.endswith("pct") else "ms", note)
                 for name, value in overhead(rt, p).items()]
    if "quality" in p["parts"]:
        rows += quality(rt, p, ctx)
    return rows


def quality(rt: Runtime, p: dict[str, Any], ctx: BenchContext) -> list[Row]:
    """Held-out perplexity (base / talora / dgr) and infilling accuracy per eval domain."""
    rows = []
    cfg = LoRAConfig()
    bank = learn_patterns(rt, p, cfg)
    th = TALoRAHook(bank, LoRAModel(rt.model, cfg))
    for domain in p["eval_domains"]:
        x0 = windows(token_stream(_docs(p, domain, "test"), rt.tokenizer), p["seq_len"],
                     p["eval_tokens"])
        qnote = (f"{len(x0)} windows x {p['seq_len']} tokens (prompt {p['prompt_len']}), "
                 f"{p['samples']} t per window; patterns of {', '.join(p['pattern_domains'])}, "
                 f"{p['train_steps']} steps per bank")
        nll = {}
        for variant in ("base", "talora", "dgr"):
            nll[variant], hit = answer_nll(rt, x0, p, variant, th)
            rows.append(ctx.row("dgr", f"ppl_{variant}_{domain}", float(np.exp(nll[variant])),
                                "ppl", qnote + f"; forwards with a local pattern {hit:.2f}"))
        for variant in ("talora", "dgr"):
            rows.append(ctx.row("dgr", f"ppl_change_{variant}_{domain}",
                                100 * (np.exp(nll[variant] - nll["base"]) - 1), "%", qnote))
        for on in (False, True):
            dgr = DGRHook(_dgr_config(p, enabled=on, retrieve=on), talora_hook=th)
            acc = infill_accuracy(rt, x0, p, th, dgr)
            rows.append(ctx.row("dgr", f"infill_acc_{'dgr' if on else 'talora'}_{domain}", acc,
                                "fraction", f"{p['infill_prompts']} prompts, greedy, "
                                f"{p['infill_gen']} steps; remasked {dgr.stats['remasked']}"))
    return rows
