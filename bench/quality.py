"""Quality: held-out perplexity of the default model and of its int8/int4 versions.

Also the held-out prompts and the chrF score that the other sections use, so
every section measures on the same documents and with one fixed metric:

* prompts are the first tokens (after BOS) of test documents of the base
  domains, taken in corpus order, spread evenly over the domains; the rest of
  each document up to the requested length is its reference continuation;
* chrF (Popović 2015; character n-grams 1..6, beta 2, whitespace ignored, as
  sacrebleu's default) scores a continuation against its reference, 0-100.
  Character n-grams give partial credit to near-miss words and need no second
  model, so the score favours neither the diffusion model nor the AR twin.

Perplexity is the ELBO bound for the diffusion model (``ruvdllm.evaluate``),
with a fixed seed so the float and quantized models see the same masks and
their ratio is the quantization's effect, not the estimator's.

The suffix windows of the sampler (DPad's suffix dropout, ``SamplerConfig.suffix``)
change what the model sees, so their cost is measured here as chrF of the default
model's answers against the held-out continuations, next to the full suffix.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from tqdm import tqdm

from bench.common import BenchContext, Row, agreement
from bench.report import labelled
from ruvdllm.corpus import documents
from ruvdllm.evaluate import perplexity
from ruvdllm.runtime import load
from ruvdllm.sampler import Sampler, SamplerConfig
from ruvdllm.tokenizer import Tokenizer
from ruvdllm.train import token_stream

BASE_DOMAINS = ("wiki", "shakespeare", "bible")


def heldout_prompts(tok: Tokenizer, n: int, prompt_length: int, continuation: int,
                    domains: tuple[str, ...] = BASE_DOMAINS) -> list[tuple[list[int], list[int]]]:
    """``n`` (prompt, reference continuation) token pairs from test documents.

    Only documents with at least ``prompt_length + continuation`` tokens
    (BOS included) are used; ValueError if the domains hold too few.
    """
    need = prompt_length + continuation
    per_domain = [n // len(domains) + (i < n % len(domains)) for i in range(len(domains))]
    pairs: list[tuple[list[int], list[int]]] = []
    for domain, count in zip(domains, per_domain, strict=True):
        ids = (tok.encode(doc, add_bos=True) for doc in documents(domain, "test"))
        long_enough = [x[:need] for x in ids if len(x) >= need][:count]
        if len(long_enough) < count:
            raise ValueError(f"{domain}: only {len(long_enough)} test documents have {need} "
                             f"tokens, {count} needed")
        pairs += [(x[:prompt_length], x[prompt_length:]) for x in long_enough]
    return pairs


def _ngrams(text: str, n: int) -> Counter[str]:
    return Counter(text[i:i + n] for i in range(len(text) - n + 1))


def chrf(hypothesis: str, reference: str, order: int = 6, beta: float = 2.0) -> float:
    """Sentence chrF in [0, 100]: F-beta of character n-gram precision and recall.

    Precision and recall are averaged over the orders 1..``order`` that the
    reference has, as sacrebleu does; an empty hypothesis scores 0.
    """
    hyp, ref = "".join(hypothesis.split()), "".join(reference.split())
    precisions, recalls = [], []
    for n in range(1, order + 1):
        h, r = _ngrams(hyp, n), _ngrams(ref, n)
        if not r:
            break
        match = sum((h & r).values())
        precisions.append(match / max(sum(h.values()), 1))
        recalls.append(match / sum(r.values()))
    if not precisions:
        return 0.0
    prec, rec = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    if prec + rec == 0:
        return 0.0
    return 100.0 * (1 + beta**2) * prec * rec / (beta**2 * prec + rec)


def run(params: dict[str, Any], ctx: BenchContext) -> list[Row]:
    """Perplexity per domain for float/int8/int4/fp8/w4a8 and the worst quantized ratio."""
    domains: list[str] = params["domains"]
    schemes = ("none", "int8", "int4", "fp8", "w4a8")
    ppl: dict[tuple[str, str], float] = {}
    for quant in tqdm(schemes, desc="quality", leave=False):
        rt = load(params["model"], device=ctx.device, quant=quant,
                  group_size=params["int4_group_size"])
        for domain in domains:
            stream = token_stream(documents(domain, params["split"]), rt.tokenizer)
            ppl[quant, domain] = perplexity(rt.model, stream, params["seq_len"],
                                            params["max_tokens"], params["samples"])
    rows = [ctx.row("quality", labelled("ppl", domain=d, quant=q), ppl[q, d], "ppl")
            for q in schemes for d in domains]
    geomean = math.exp(sum(math.log(ppl["none", d]) for d in domains) / len(domains))
    rows.append(ctx.row("quality", "ppl_geomean", geomean, "ppl",
                        note=f"float, ELBO bound, geometric mean over {', '.join(domains)}"))
    for quant in schemes[1:]:
        ratios = {d: ppl[quant, d] / ppl["none", d] for d in domains}
        worst = max(ratios, key=ratios.__getitem__)
        rows.append(ctx.row("quality", f"{quant}_ppl_ratio_max", ratios[worst], "x",
                            note=f"worst domain: {worst}"))
    return rows + suffix_rows(params, ctx)


def suffix_rows(params: dict[str, Any], ctx: BenchContext) -> list[Row]:
    """chrF of greedy answers with the whole masked suffix and with each window."""
    rt = load(params["model"], device=ctx.device)
    G, n = params["sampling_output_length"], params["sampling_prompts"]
    pairs = heldout_prompts(rt.tokenizer, n, params["sampling_prompt_length"], G)
    prompts = [p for p, _ in pairs]
    refs = [rt.tokenizer.decode(c) for _, c in pairs]
    cache = params["sampling_cache"]
    sampler, rows = Sampler(rt.model), []
    full: list[list[int]] = []
    for suffix in [None, *params["suffixes"]]:
        cfg = SamplerConfig(steps=params["sampling_steps"], gen_length=G, block_length=32,
                            cache=cache, suffix=suffix)
        answers = sampler.generate(prompts, cfg)
        score = sum(chrf(rt.tokenizer.decode(a), r) for a, r in zip(answers, refs, strict=True))
        what = f"{n} held-out prompts, {G} tokens, {cfg.steps} steps, block 32, {cache} cache"
        rows.append(ctx.row("quality", labelled("chrf", cache=cache, suffix=suffix),
                            score / n, "chrF", note=what))
        if suffix is None:
            full = answers
            continue
        rows.append(ctx.row("quality", labelled("suffix_agreement_pct", suffix=suffix),
                            agreement(answers, full, G), "%",
                            note=f"answer tokens equal to the full suffix's, {what}"))
    return rows
