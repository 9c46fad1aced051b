"""LLaDA- and Dream-layout checkpoints load unchanged and compute the published math."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from ruvdllm.checkpoint import (
    ASSETS,
    NAMED,
    CheckpointError,
    load_model,
    save_checkpoint,
    tokenizer_file,
)
from ruvdllm.config import ModelConfig
from tests.llada_reference import (
    DREAM_CONFIG,
    LLADA_CONFIG,
    reference_logits,
    write_dream,
    write_llada,
)

IDS = [1, 400, 17, 3, 3, 905, 2, 77]


def _llada_ref(tensors: dict) -> np.ndarray:
    c = LLADA_CONFIG
    return reference_logits(tensors, IDS, d=c["d_model"], n_heads=c["n_heads"],
                            n_kv=c["n_kv_heads"], n_layers=c["n_layers"],
                            theta=c["rope_theta"], eps=c["rms_norm_eps"])


@pytest.mark.parametrize("shards", [1, 3])
def test_llada_layout_matches_reference_math(tmp_path, shards):
    tensors = write_llada(tmp_path / "ck", shards=shards)
    model = load_model(tmp_path / "ck")
    assert model.config.n_kv_heads == 2 and model.config.rope_theta == 500000.0
    with torch.no_grad():
        ours = model(torch.tensor([IDS])).logits[0].double().numpy()
    np.testing.assert_allclose(ours, _llada_ref(tensors), rtol=1e-4, atol=1e-4)


def test_dream_layout_matches_reference_math(tmp_path):
    tensors = write_dream(tmp_path / "dream")
    model = load_model(tmp_path / "dream")
    assert model.config.include_qkv_bias and model.config.logits_shift
    c = DREAM_CONFIG
    ref = reference_logits(tensors, IDS, d=c["hidden_size"], n_heads=c["num_attention_heads"],
                           n_kv=c["num_key_value_heads"], n_layers=c["num_hidden_layers"],
                           theta=c["rope_theta"], eps=c["rms_norm_eps"], dream=True)
    with torch.no_grad():
        ours = model(torch.tensor([IDS])).logits[0].double().numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_save_then_load_round_trip_and_keeps_llada_keys(tmp_path):
    write_llada(tmp_path / "a")
    model = load_model(tmp_path / "a")
    save_checkpoint(model, tmp_path / "b", tmp_path / "a" / "tokenizer.json", max_shard_bytes=4096)
    assert (tmp_path / "b" / "model.safetensors.index.json").exists()
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    for key in LLADA_CONFIG:  # every LLaDA key survives, including ones we do not use
        assert key in saved, key
    again = load_model(tmp_path / "b")
    x = torch.tensor([IDS])
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)


def test_dtype_on_load(tmp_path):
    write_llada(tmp_path / "a")
    model = load_model(tmp_path / "a", dtype=torch.bfloat16)
    assert model.transformer.blocks[0].q_proj.weight.dtype == torch.bfloat16


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such model folder"):
        load_model(tmp_path / "nope")


def test_corrupt_safetensors(tmp_path):
    write_llada(tmp_path / "a")
    (tmp_path / "a" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(CheckpointError, match="corrupt safetensors"):
        load_model(tmp_path / "a")


def test_config_tensor_mismatch(tmp_path):
    write_llada(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg["n_layers"] = 3
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing"):
        load_model(tmp_path / "a")
    cfg["n_layers"], cfg["mlp_hidden_size"] = 2, 64
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        load_model(tmp_path / "a")


def test_bad_config_values_refused():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(d_model=32, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="missing required"):
        ModelConfig.from_dict({"d_model": 32})


def test_save_replaces_atomically(tmp_path):
    write_llada(tmp_path / "a")
    model = load_model(tmp_path / "a")
    save_checkpoint(model, tmp_path / "b")
    save_checkpoint(model, tmp_path / "b")  # overwrite leaves one folder, no temp leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def _snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("stranger", ["notes.txt", "modeling_llada.py", "sub/a.txt"])
def test_save_refuses_a_folder_holding_other_files(tmp_path, stranger):
    write_llada(tmp_path / "a")
    model = load_model(tmp_path / "a")
    (tmp_path / "a" / stranger).parent.mkdir(exist_ok=True)
    (tmp_path / "a" / stranger).write_text("the user's")
    before = _snapshot(tmp_path / "a")
    with pytest.raises(CheckpointError, match=f"holds '{stranger.split('/')[0]}'"):
        save_checkpoint(model, tmp_path / "a")
    assert _snapshot(tmp_path / "a") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    (tmp_path / "f").write_text("a file")
    with pytest.raises(CheckpointError, match="not a folder"):
        save_checkpoint(model, tmp_path / "f")
    assert (tmp_path / "f").read_text() == "a file"


def test_failed_save_leaves_the_old_checkpoint_and_no_leftovers(tmp_path, monkeypatch):
    import ruvdllm.checkpoint as checkpoint

    write_llada(tmp_path / "a")
    model = load_model(tmp_path / "a")
    save_checkpoint(model, tmp_path / "b")
    before = _snapshot(tmp_path / "b")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(model, tmp_path / "b")
    assert _snapshot(tmp_path / "b") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_saved_checkpoint_follows_the_umask(tmp_path):
    write_llada(tmp_path / "a")
    model = load_model(tmp_path / "a")
    old = os.umask(0o022)
    try:
        save_checkpoint(model, tmp_path / "b", tmp_path / "a" / "tokenizer.json")
    finally:
        os.umask(old)
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o755
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "b").iterdir()}
    assert modes == {"config.json": 0o644, "tokenizer.json": 0o644, "model.safetensors": 0o644}


def test_embedded_models_share_one_tokenizer(tmp_path):
    from ruvdllm.quant import quantize_checkpoint

    for folder in NAMED.values():  # no copy of their own: the shared file
        assert tokenizer_file(folder) == ASSETS / "tokenizer.json"
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "tokenizer.json").write_text("{}")
    assert tokenizer_file(tmp_path / "own") == tmp_path / "own" / "tokenizer.json"
    assert tokenizer_file(tmp_path) == tmp_path / "tokenizer.json"  # missing: refused on load
    dst = quantize_checkpoint("default", tmp_path / "q", "int8")
    assert (dst / "tokenizer.json").read_bytes() == (ASSETS / "tokenizer.json").read_bytes()
