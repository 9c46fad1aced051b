"""Left-to-right decoding of the causal AR twin: the KV-cached loop equals the plain one."""

from __future__ import annotations

import pytest
import torch

from ruvdllm.ar import ar_generate, ar_stream
from ruvdllm.runtime import Runtime, load
from ruvdllm.sampler import Sampler, SamplerConfig, SamplerError, penalize_repeats

PROMPTS = ["Once upon a time", "The river", "In the beginning God created"]


@pytest.fixture(scope="module")
def ar() -> Runtime:
    return load("default-ar", device="cpu")


def ids(rt: Runtime) -> list[list[int]]:
    return [rt.encode_prompt(p) for p in PROMPTS]


@torch.no_grad()
def plain_decoding(model, prompt: list[int], n: int, penalty: float = 1.0) -> list[int]:
    """Greedy, one full forward over the whole sequence per token, no cache, no padding."""
    cfg = model.config
    seq = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([seq])).logits[:, -1:, : cfg.vocab_size]  # (1, 1, V)
        if penalty != 1.0:
            special = [cfg.mask_token_id, cfg.pad_token_id, cfg.eos_token_id]
            logits = penalize_repeats(logits, torch.tensor([seq]), penalty, special)
        seq.append(int(logits.argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_cached_batch_equals_plain_decoding(ar, penalty):
    prompts = ids(ar)  # different lengths: the batch is left-padded
    out = ar_generate(ar.model, prompts, 12, repetition_penalty=penalty, stop_at_eos=False)
    assert out == [plain_decoding(ar.model, p, 12, penalty) for p in prompts]


def test_stops_after_the_first_eos_and_cuts_there(ar, monkeypatch):
    prompts = ids(ar)
    full = ar_generate(ar.model, prompts, 12, stop_at_eos=False)
    eos = full[0][3]  # make the 4th greedy token of row 0 the end of text
    monkeypatch.setattr(ar.model.config, "eos_token_id", eos)
    first = full[0].index(eos)
    steps = list(ar_stream(ar.model, prompts[:1], 12))
    assert len(steps) == first + 1 and all(s.shape == (1,) for s in steps)
    cut = ar_generate(ar.model, prompts, 12)
    assert cut == [row[: row.index(eos)] if eos in row else row for row in full]
    assert cut[0] == full[0][:first]


def test_sampling_follows_the_seed(ar):
    prompts = ids(ar)
    a = ar_generate(ar.model, prompts, 16, temperature=1.0, seed=1, stop_at_eos=False)
    b = ar_generate(ar.model, prompts, 16, temperature=1.0, seed=1, stop_at_eos=False)
    c = ar_generate(ar.model, prompts, 16, temperature=1.0, seed=2, stop_at_eos=False)
    assert a == b and a != c
    assert a != ar_generate(ar.model, prompts, 16, stop_at_eos=False)


def test_runtime_decodes_a_causal_model_left_to_right(ar):
    text = ar.generate(PROMPTS[0], gen_length=24, repetition_penalty=1.2)
    expected = ar_generate(ar.model, ids(ar)[:1], 24, repetition_penalty=1.2)[0]
    assert text == ar.tokenizer.decode(expected) and text.strip()
    # diffusion-only options do not apply (gen_length 24 is no multiple of block_length 32)
    pieces = list(ar.stream(PROMPTS[0], gen_length=24, repetition_penalty=1.2, steps=7))
    assert len(pieces) > 1 and "".join(pieces) == text


def test_each_decoder_refuses_the_other_kind_of_model(ar):
    with pytest.raises(SamplerError, match="causal model"):
        ar_generate(load("default", device="cpu").model, [[1, 5, 6]], 2)
    with pytest.raises(SamplerError, match="cannot fill masked blocks"):
        Sampler(ar.model).generate(ids(ar), SamplerConfig(steps=8, gen_length=32))
    with pytest.raises(SamplerError, match="exceeds max_sequence_length"):
        ar_generate(ar.model, ids(ar), 10_000)
    with pytest.raises(SamplerError, match="temperature must be a finite number"):
        ar_generate(ar.model, ids(ar), 4, temperature=float("nan"))
