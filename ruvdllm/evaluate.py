"""Held-out perplexity: the masked-diffusion ELBO bound, or exact AR perplexity.

For a diffusion model the exact likelihood is intractable; the ELBO of
absorbing-state diffusion (LLaDA eq. 3, MDLM) bounds the per-token NLL:

    -log p(x) / L  <=  E_t [ 1/t * sum_{i masked at t} -log p(x_i | x_t) ] / L.

It is estimated with ``samples`` stratified values of ``t`` per window and a
fixed seed, so two runs (e.g. fp32 against int8) see the same masks and their
difference is the model's, not the estimator's. The AR twin gets the exact
next-token perplexity on the same windows. Windows are consecutive
``seq_len``-token slices of the packed test stream (``BOS doc EOS`` ...).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ruvdllm.model import DiffusionLM


def windows(stream: Tensor, seq_len: int, max_tokens: int | None = None) -> Tensor:
    """``(N, seq_len)`` consecutive windows of a 1-D stream (tail dropped)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 tokens, got {seq_len}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if max_tokens is not None:
        stream = stream[:max_tokens]
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"need at least {seq_len} tokens to evaluate, got {len(stream)}")
    return stream[: n * seq_len].view(n, seq_len).long()  # (N, L)


@torch.no_grad()
def diffusion_nll(model: DiffusionLM, x0: Tensor, samples: int = 8, seed: int = 0,
                  batch_size: int = 32) -> float:
    """Mean ELBO bound on per-token NLL (nats) over windows ``x0`` ``(N, L)``."""
    dev = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    mask_id = model.config.mask_token_id
    total, count = 0.0, 0
    for k in range(samples):
        t_k = (k + torch.rand(len(x0), generator=gen)) / samples  # stratified in [k/K, (k+1)/K)
        t_k = t_k.clamp(min=1e-3)
        noise = torch.rand(x0.shape, generator=gen)
        for i in range(0, len(x0), batch_size):
            x = x0[i:i + batch_size].to(dev)
            t = t_k[i:i + batch_size].to(dev)
            masked = noise[i:i + batch_size].to(dev) < t[:, None]
            xt = torch.where(masked, mask_id, x)
            logits = model(xt).logits[..., : model.config.vocab_size]
            nll = F.cross_entropy(logits.float().transpose(1, 2), x, reduction="none")
            total += float((nll * masked / t[:, None]).sum())
            count += x.numel()
    return total / count


@torch.no_grad()
def ar_nll(model: DiffusionLM, x0: Tensor, batch_size: int = 32) -> float:
    """Exact next-token NLL per predicted token (nats) for the causal twin."""
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(x0), batch_size):
        x = x0[i:i + batch_size].to(dev)
        logits = model(x[:, :-1]).logits[..., : model.config.vocab_size]
        total += float(F.cross_entropy(logits.float().transpose(1, 2), x[:, 1:],
                                       reduction="sum"))
        count += x[:, 1:].numel()
    return total / count


def perplexity(model: DiffusionLM, stream: Tensor, seq_len: int = 256,
               max_tokens: int | None = None, samples: int = 8, seed: int = 0) -> float:
    """Test perplexity (an upper bound for diffusion models, exact for AR)."""
    if samples < 1:
        raise ValueError(f"samples must be at least 1 masking draw per window, got {samples}")
    if seq_len > model.config.max_sequence_length:  # positions it never saw: a meaningless score
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_sequence_length "
                         f"{model.config.max_sequence_length}")
    x0 = windows(stream, seq_len, max_tokens)
    nll = ar_nll(model, x0) if model.config.causal else diffusion_nll(model, x0, samples, seed)
    return math.exp(nll)


def distinct_n(tokens: list[int], n: int = 3) -> float:
    """Share of a text's n-grams that are unique (1.0: no repeated n-gram)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def token_f1(hypothesis: list[int], reference: list[int]) -> float:
    """Bag-of-tokens F1 between a continuation and the document's true one."""
    from collections import Counter

    common = sum((Counter(hypothesis) & Counter(reference)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(hypothesis), common / len(reference)
    return 2 * precision * recall / (precision + recall)


@torch.no_grad()
def continuation_nll(scorer: DiffusionLM, prompts: list[list[int]],
                     answers: list[list[int]]) -> float:
    """Per-token NLL of ``answers`` after ``prompts`` under a causal scorer (the AR twin).

    A fluency proxy: low for likely text, but also low for loops, so it is read
    together with :func:`distinct_n`.
    """
    if not scorer.config.causal:
        raise ValueError("continuation_nll needs a causal (AR) scorer model")
    dev = next(scorer.parameters()).device
    total, count = 0.0, 0
    for prompt, answer in zip(prompts, answers, strict=True):
        if not answer:
            continue
        ids = torch.tensor([prompt + answer], device=dev)
        logits = scorer(ids[:, :-1]).logits[0, len(prompt) - 1:, : scorer.config.vocab_size]
        total += float(F.cross_entropy(logits.float(), ids[0, len(prompt):], reduction="sum"))
        count += len(answer)
    return total / max(count, 1)
