"""Pieces the sections measure with: the AR twin's cached decoding and held-out prompts."""

import pytest
import torch

from bench.parity import ar_generate, cut_at_eos
from bench.quality import heldout_prompts
from ruvdllm.runtime import load


@pytest.fixture(scope="module")
def ar():
    return load("default-ar", device="cpu")


def greedy_without_cache(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1, : model.config.vocab_size]
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


@torch.no_grad()
def test_ar_generate_matches_uncached_greedy_in_a_padded_batch(ar):
    prompts = [p for p, _ in heldout_prompts(ar.tokenizer, 3, 12, 0)]
    prompts[1] = prompts[1][:5]  # left padding in the batch
    out = ar_generate(ar.model, prompts, 6)
    assert out == [greedy_without_cache(ar.model, p, 6) for p in prompts]


def test_ar_generate_refuses_a_bidirectional_model():
    with pytest.raises(ValueError, match="causal"):
        ar_generate(load("default", device="cpu").model, [[1, 5, 6]], 2)


def test_heldout_prompts(ar):
    pairs = heldout_prompts(ar.tokenizer, 5, 16, 8)
    assert len(pairs) == 5
    assert all(len(p) == 16 and len(c) == 8 and p[0] == ar.tokenizer.bos_token_id
               for p, c in pairs)
    with pytest.raises(ValueError, match="test documents"):
        heldout_prompts(ar.tokenizer, 3, 400, 400)


def test_cut_at_eos():
    assert cut_at_eos([5, 6, 2, 7], 2) == [5, 6]
    assert cut_at_eos([5, 6], 2) == [5, 6]
