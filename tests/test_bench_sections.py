"""Pieces the sections measure with: held-out prompts, answers cut at EOS."""

import pytest

from bench.parity import cut_at_eos
from bench.quality import heldout_prompts
from ruvdllm.runtime import load


@pytest.fixture(scope="module")
def ar():
    return load("default-ar", device="cpu")


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
