"""Local learning: loss falls on the node's text, FFA-LoRA trains B only, model untouched."""

from __future__ import annotations

import pytest
import torch

from ruvdllm.checkpoint import ASSETS
from ruvdllm.config import ModelConfig
from ruvdllm.learn import prompt_embedding, train_bank
from ruvdllm.lora import LoRAConfig, LoRAModel, frozen_a, key
from ruvdllm.model import DiffusionLM
from ruvdllm.tokenizer import Tokenizer

TEXT = ["def add(a, b):\n    return a + b\n\n" * 40, "The quick brown fox jumps. " * 60]
CFG = LoRAConfig(rank=4)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(ASSETS / "tokenizer.json", mask_token=3, eos_token=2, pad_token=0,
                     bos_token=1)


@pytest.fixture
def model() -> DiffusionLM:
    torch.manual_seed(0)
    return DiffusionLM(ModelConfig(d_model=32, n_heads=4, n_kv_heads=4, n_layers=2,
                                   mlp_hidden_size=64, max_sequence_length=128)).eval()


def test_train_bank_lowers_loss_and_leaves_the_model_alone(model, tok):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    adapter, metrics = train_bank(model, tok, TEXT, "domain", lora=CFG, steps=20, lr=1e-2,
                                  seq_len=32, batch_size=4)
    assert metrics["loss_after"] < metrics["loss_before"]
    assert metrics["quality_gain"] > 0 and metrics["examples"] > 0
    assert set(adapter) == {key(i, t, p) for i in range(2) for t in CFG.targets for p in "AB"}
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert type(model.transformer.blocks[0].q_proj) is torch.nn.Linear


def test_ffa_trains_b_only_from_the_global_adapter(model, tok):
    a = frozen_a(model, CFG, 11)
    init, _ = train_bank(model, tok, TEXT, "fine", lora=CFG, ffa_seed=11, steps=2,
                         seq_len=32, batch_size=2)
    trained, _ = train_bank(model, tok, TEXT, "fine", lora=CFG, init=init, ffa_seed=11,
                            steps=3, seq_len=32, batch_size=2)
    assert all(torch.equal(trained[k], a[k]) for k in a)
    b = key(0, "q_proj", "B")
    assert not torch.equal(trained[b], init[b])
    with pytest.raises(ValueError, match="another seed"):
        train_bank(model, tok, TEXT, "fine", lora=CFG, init=init, ffa_seed=12, steps=1,
                   seq_len=32)


def test_train_bank_works_while_lora_is_attached(model, tok):
    lm = LoRAModel(model, CFG)
    adapter, _ = train_bank(model, tok, TEXT, "coarse", lora=CFG, steps=1, seq_len=32)
    lm.add("local", adapter)  # the trained adapter fits the serving wrappers
    assert lm.ids == ["local"]


def test_bad_inputs_are_refused(model, tok):
    with pytest.raises(ValueError, match="bank"):
        train_bank(model, tok, TEXT, "middle", lora=CFG)
    with pytest.raises(ValueError, match="tokens"):
        train_bank(model, tok, ["hi"], "fine", lora=CFG)
    with pytest.raises(ValueError, match="shape"):
        train_bank(model, tok, TEXT, "fine", lora=CFG,
                   init={key(0, "q_proj", "A"): torch.zeros(4, 31)})


def test_prompt_embedding_is_deterministic_and_sized(model, tok):
    e1, e2 = prompt_embedding(model, tok, TEXT), prompt_embedding(model, tok, TEXT)
    assert e1.shape == (32,)
    assert (e1 == e2).all()
    with pytest.raises(ValueError):
        prompt_embedding(model, tok, [])


def test_zero_eval_batches_skips_scoring_and_trains_the_same(model, tok):
    kw = {"lora": CFG, "steps": 2, "seq_len": 32, "batch_size": 2, "seed": 3}
    scored, m1 = train_bank(model, tok, TEXT, "domain", **kw)
    skipped, m0 = train_bank(model, tok, TEXT, "domain", eval_batches=0, **kw)
    assert set(m0) == {"examples"} and {"loss_before", "quality_gain"} <= set(m1)
    assert all(torch.equal(scored[k], skipped[k]) for k in scored)
    with pytest.raises(ValueError, match="eval_batches"):
        train_bank(model, tok, TEXT, "domain", eval_batches=-1, **kw)


def test_twins_are_reused_until_the_parameters_change(model, tok):
    from ruvdllm import learn

    train_bank(model, tok, TEXT, "fine", lora=CFG, steps=1, seq_len=32)
    first = learn._cached_view(model, "train").twin
    train_bank(model, tok, TEXT, "fine", lora=CFG, steps=1, seq_len=32)
    assert learn._cached_view(model, "train").twin is first  # detached after use, reused
    assert type(first.transformer.blocks[0].q_proj) is torch.nn.Linear
    before = prompt_embedding(model, tok, TEXT)
    with torch.no_grad():
        model.transformer.blocks[0].q_proj.weight = torch.nn.Parameter(
            model.transformer.blocks[0].q_proj.weight * 2)
    assert learn._cached_view(model, "train").twin is not first
    assert not (prompt_embedding(model, tok, TEXT) == before).all()
