"""Training objectives learn, and a stopped run resumes where it stopped."""

from __future__ import annotations

import csv
import json
import re

import pytest
import torch

from ruvdllm.checkpoint import load_model
from ruvdllm.config import ModelConfig
from ruvdllm.model import DiffusionLM
from ruvdllm.train import TrainConfig, ar_loss, diffusion_loss, train

TOKENIZER = "ruvdllm/assets/tokenizer.json"
TINY = {"d_model": 32, "n_heads": 2, "n_kv_heads": 2, "n_layers": 1, "mlp_hidden_size": 64}


def _export(root) -> None:
    text = "the cat sat on the mat and the dog sat on the log. " * 20
    for split in ("train", "valid"):
        (root / "wiki").mkdir(parents=True, exist_ok=True)
        with open(root / "wiki" / f"{split}.jsonl", "w") as f:
            for i in range(20):
                f.write(json.dumps({"text": f"{i} {text}"}) + "\n")


def _config(tmp_path, **kw) -> TrainConfig:
    base = dict(data=str(tmp_path / "data"), domains=("wiki",), out=str(tmp_path / "run"),
                seq_len=32, batch_size=8, lr=3e-3, warmup=5, max_steps=60, eval_every=30,
                eval_batches=2, compile=False, model=TINY, prefix_fraction=0.5)
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def test_diffusion_training_lowers_validation_loss_and_resumes(tmp_path):
    _export(tmp_path / "data")
    best = train(_config(tmp_path, max_steps=30), TOKENIZER)
    rows = list(csv.DictReader((tmp_path / "run" / "loss.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == [30]
    assert load_model(best).config.causal is False
    train(_config(tmp_path, max_steps=60), TOKENIZER)  # resumes at step 30
    rows = list(csv.DictReader((tmp_path / "run" / "loss.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == [30, 60]
    assert float(rows[1]["valid_loss"]) < float(rows[0]["valid_loss"])


def test_ar_twin_trains_causally(tmp_path):
    _export(tmp_path / "data")
    best = train(_config(tmp_path, objective="ar", max_steps=30), TOKENIZER)
    assert load_model(best).config.causal is True


def test_losses_on_a_fixed_batch():
    torch.manual_seed(0)
    model = DiffusionLM(ModelConfig(**TINY, vocab_size=64, embedding_size=64, mask_token_id=3))
    x0 = torch.randint(4, 64, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = diffusion_loss(model, x0, eps=1e-3, prefix_fraction=0.0)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
    causal = DiffusionLM(ModelConfig(**TINY, vocab_size=64, embedding_size=64, mask_token_id=3,
                                     causal=True))
    assert torch.isfinite(ar_loss(causal, x0))


def test_init_continues_from_a_checkpoint_with_config_overrides(tmp_path):
    _export(tmp_path / "data")
    first = train(_config(tmp_path, max_steps=30), TOKENIZER)
    start = load_model(first)
    # zero steps of training after init: the saved network is the initial one, with dropout
    cont = _config(tmp_path, out=str(tmp_path / "cont"), init=str(first), max_steps=1,
                   lr=0.0, model={"residual_dropout": 0.2})
    second = load_model(train(cont, TOKENIZER))
    assert second.config.residual_dropout == 0.2
    assert second.config.d_model == TINY["d_model"]
    for name, value in start.state_dict().items():
        torch.testing.assert_close(second.state_dict()[name], value)


def test_init_refuses_a_mismatched_checkpoint(tmp_path):
    _export(tmp_path / "data")
    first = train(_config(tmp_path, max_steps=30), TOKENIZER)
    with pytest.raises(ValueError, match="cannot be trained with the ar objective"):
        train(_config(tmp_path, out=str(tmp_path / "ar"), objective="ar", init=str(first)),
              TOKENIZER)
    assert not (tmp_path / "ar").exists()
    with pytest.raises(ValueError, match="changes the network's shape"):
        train(_config(tmp_path, out=str(tmp_path / "wide"), init=str(first),
                      model={**TINY, "d_model": 64}), TOKENIZER)
    with pytest.raises(ValueError, match="exceeds the model's max_sequence_length 512"):
        train(_config(tmp_path, out=str(tmp_path / "long"), init=str(first), seq_len=600),
              TOKENIZER)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "run"]


@pytest.mark.parametrize("change,message", [
    ({"seq_len": 1}, "seq_len must be at least 2"),
    ({"batch_size": 0}, "batch_size must be positive"),
    ({"eval_every": 0}, "eval_every must be positive"),
    ({"time_budget": -1.0}, "time_budget must be positive"),
    ({"lr": -1e-3, "warmup": -1}, "lr must be >= 0, got -0.001; warmup must be >= 0"),
    ({"prefix_fraction": 1.5}, "prefix_fraction must be in [0, 1]"),
    ({"objective": "mlm"}, "unknown objective 'mlm'"),
])
def test_config_refuses_settings_no_run_can_use(tmp_path, change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _config(tmp_path, **change)


def test_refusals_leave_the_run_folder_as_it_was(tmp_path):
    _export(tmp_path / "data")
    train(_config(tmp_path, max_steps=30), TOKENIZER)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    with pytest.raises(ValueError, match="a run of a model of another shape"):
        train(_config(tmp_path, model={**TINY, "d_model": 64}), TOKENIZER)
    with pytest.raises(ValueError, match=r"the train split has \d+ tokens; a window of seq_len"):
        train(_config(tmp_path, seq_len=100_000), TOKENIZER)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before
    with pytest.raises(ValueError, match="the train split"):
        train(_config(tmp_path, out=str(tmp_path / "new"), seq_len=100_000), TOKENIZER)
    assert not (tmp_path / "new").exists()
