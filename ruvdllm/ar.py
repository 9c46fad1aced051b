"""Left-to-right decoding of a causal model (the AR twin), one KV-cached forward per token.

The masked-diffusion sampler fills blocks of masks in any order, which a causal model was
never trained to do: run on the AR twin it returns noise. A causal model predicts the next
token from the ones before it, so it decodes one position per forward, reusing the keys and
values of every earlier position (the standard autoregressive loop; Radford et al. 2019).

The options it shares with the sampler mean the same: ``gen_length``, ``temperature``
(Gumbel-max, :func:`~ruvdllm.sampler.gumbel_perturb`), ``seed``, ``repetition_penalty``
(CTRL, :func:`~ruvdllm.sampler.penalize_repeats`). The diffusion ones (steps, blocks,
threshold, caches, remasking, suffix) have no meaning here. The parity bench decodes with
``stop_at_eos=False``, so every row produces exactly ``gen_length`` tokens (seed 002 fixes
the output length).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ruvdllm.model import DiffusionLM
from ruvdllm.sampler import (
    SamplerError,
    check_sampling,
    gumbel_perturb,
    left_pad,
    penalize_repeats,
)


@torch.no_grad()
def ar_stream(model: DiffusionLM, prompts: list[list[int]], gen_length: int, *,
              temperature: float = 0.0, seed: int = 0, repetition_penalty: float = 1.0,
              stop_at_eos: bool = True) -> Iterator[Tensor]:
    """The next token of every row, ``(B,)``, per step; stops once every row has an EOS."""
    cfg = model.config
    if not cfg.causal:
        raise SamplerError("left-to-right decoding needs a causal model (config.causal)")
    if not prompts or any(not p for p in prompts):
        raise SamplerError("every prompt needs at least one token")
    if gen_length <= 0:
        raise SamplerError("gen-length must be positive")
    check_sampling(temperature, repetition_penalty)
    width = max(len(p) for p in prompts)
    if width + gen_length > cfg.max_sequence_length:
        raise SamplerError(f"prompt ({width} tokens) + gen-length ({gen_length}) exceeds "
                           f"max_sequence_length {cfg.max_sequence_length}")
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(seed)
    special = [cfg.mask_token_id, cfg.pad_token_id, cfg.eos_token_id]
    ids, valid = left_pad(prompts, cfg.pad_token_id, dev)  # (B, P)
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    out = model(ids, positions=positions, valid=valid, return_cache=True,
                logits_slice=slice(-1, None))
    pos = positions[:, -1:] + 1  # (B, 1)
    one = torch.ones_like(pos, dtype=torch.bool)
    seen, done = ids, torch.zeros(len(prompts), dtype=torch.bool, device=dev)
    for i in range(gen_length):
        logits = out.logits[:, -1:, : cfg.vocab_size]  # (B, 1, V)
        if repetition_penalty != 1.0:
            logits = penalize_repeats(logits, seen, repetition_penalty, special)
        tok = gumbel_perturb(logits, temperature, gen).argmax(-1)  # (B, 1)
        yield tok[:, 0]
        if i == gen_length - 1:
            return
        if repetition_penalty != 1.0:  # the timed parity loop pays for neither when off
            seen = torch.cat([seen, tok], dim=1)
        if stop_at_eos:
            done |= tok[:, 0] == cfg.eos_token_id
            if bool(done.all()):
                return
        out = model(tok, positions=pos + i, valid=one, cache=out.cache, return_cache=True)


def ar_generate(model: DiffusionLM, prompts: list[list[int]], gen_length: int, *,
                temperature: float = 0.0, seed: int = 0, repetition_penalty: float = 1.0,
                stop_at_eos: bool = True) -> list[list[int]]:
    """Answer tokens per prompt (cut at the first EOS when ``stop_at_eos``)."""
    steps = list(ar_stream(model, prompts, gen_length, temperature=temperature, seed=seed,
                           repetition_penalty=repetition_penalty, stop_at_eos=stop_at_eos))
    rows: list[list[int]] = torch.stack(steps, dim=1).tolist()  # (B, steps)
    eos = model.config.eos_token_id
    return [row[: row.index(eos)] if stop_at_eos and eos in row else row for row in rows]
