"""TALoRA: bank blend, retrieval, eviction, persistence, corrupt folders, hook mix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ruvdllm.lora import LoRAConfig, LoRAModel
from ruvdllm.talora import BANKS, BLEND_WIDTH, BankError, TALoRA, TALoRAHook, bank_weights
from tests.test_lora import random_adapter, tiny_model

CFG = LoRAConfig(rank=2, targets=("q_proj",))
DIM = 16


def small_adapter(seed: float) -> dict[str, torch.Tensor]:
    return {"model.transformer.blocks.0.q_proj.lora_A": torch.full((2, 8), float(seed)),
            "model.transformer.blocks.0.q_proj.lora_B": torch.full((8, 2), 0.5)}


def keys(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


@given(st.floats(0.0, 1.0))
def test_bank_weights_sum_to_one(t):
    w = bank_weights(t)
    assert set(w) == set(BANKS)
    assert abs(sum(w.values()) - 1.0) < 1e-9
    assert all(v >= 0 for v in w.values())


@given(st.floats(0.0, 1.0 - 1e-4))
def test_bank_weights_are_continuous(t):
    a, b = bank_weights(t), bank_weights(t + 1e-4)
    assert all(abs(a[k] - b[k]) <= 1e-4 / BLEND_WIDTH + 1e-9 for k in BANKS)


def test_bank_weights_interiors_and_boundaries():
    assert bank_weights(0.9) == {"coarse": 1.0, "domain": 0.0, "fine": 0.0}
    assert bank_weights(0.5)["domain"] == 1.0
    assert bank_weights(0.1)["fine"] == 1.0
    assert bank_weights(0.7)["coarse"] == pytest.approx(0.5)
    assert bank_weights(0.3)["fine"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        bank_weights(1.5)


def test_retrieve_finds_the_stored_key_with_softmax_weights():
    bank = TALoRA(None, DIM, CFG)
    ks = keys(50)
    ids = bank.store_many([small_adapter(i) for i in range(50)], ks,
                          [{"bank": "domain", "n": i} for i in range(50)])
    hits = bank.retrieve(ks[17], t=0.5, top_k=4)
    assert hits[0][0] == ids[17]
    assert sum(w for _, w in hits) == pytest.approx(1.0)
    assert [w for _, w in hits] == sorted((w for _, w in hits), reverse=True)
    assert bank.retrieve(ks[17], t=0.9) == []  # nothing in the coarse bank
    torch.testing.assert_close(bank.adapter(ids[17])["model.transformer.blocks.0.q_proj.lora_A"],
                               torch.full((2, 8), 17.0), rtol=0.01, atol=0)


def test_blend_zone_splits_weight_between_banks():
    bank = TALoRA(None, DIM, CFG)
    ks = keys(2)
    a = bank.store(small_adapter(1), ks[0], {"bank": "domain"})
    b = bank.store(small_adapter(2), ks[0], {"bank": "coarse"})
    hits = dict(bank.retrieve(ks[0], t=0.7))
    assert hits == {a: pytest.approx(0.5), b: pytest.approx(0.5)}


def test_least_used_pattern_is_evicted_at_capacity():
    bank = TALoRA(None, DIM, CFG, capacity=3)
    ks = keys(4)
    ids = [bank.store(small_adapter(i), ks[i], {"bank": "fine"}) for i in range(3)]
    bank.retrieve(ks[0], 0.1, top_k=1)
    bank.retrieve(ks[2], 0.1, top_k=1)
    new = bank.store(small_adapter(3), ks[3], {"bank": "fine"})
    assert sorted(bank.patterns()) == sorted([ids[0], ids[2], new])
    assert bank.stats()["evictions"] == 1
    assert bank.stats()["patterns"]["fine"] == 3
    assert bank.retrieve(ks[3], 0.1, top_k=1)[0][0] == new


def test_remove_and_wrong_inputs():
    bank = TALoRA(None, DIM, CFG)
    pid = bank.store(small_adapter(1), keys(1)[0], {"bank": "domain"})
    with pytest.raises(ValueError, match="dimension"):
        bank.store(small_adapter(1), np.zeros(DIM + 1), {"bank": "domain"})
    with pytest.raises(ValueError, match="shape"):
        bank.retrieve(np.ones(DIM + 1), 0.5)
    with pytest.raises(ValueError, match="bank"):
        bank.store(small_adapter(1), keys(1)[0], {})
    with pytest.raises(ValueError, match="differ"):
        bank.store({"model.transformer.blocks.0.q_proj.lora_A": torch.zeros(2, 9),
                    "model.transformer.blocks.0.q_proj.lora_B": torch.zeros(8, 2)},
                   keys(1)[0], {"bank": "domain"})
    with pytest.raises(ValueError, match="rank"):
        bank.set_global("fine", random_adapter(tiny_model(), LoRAConfig(rank=4), 0), 1)
    with pytest.raises(BankError, match="version is >= 0, got -1"):
        bank.set_global("fine", small_adapter(2), -1)
    assert bank.global_adapter("fine") is None
    bank.remove(pid)
    assert bank.retrieve(keys(1)[0], 0.5) == []
    with pytest.raises(KeyError):
        bank.remove(pid)


def test_save_load_survives_restart(tmp_path):
    bank = TALoRA(tmp_path / "bank", DIM, CFG, capacity=8)
    ks = keys(6)
    ids = bank.store_many([small_adapter(i) for i in range(6)], ks,
                          [{"bank": BANKS[i % 3], "source": f"doc{i}"} for i in range(6)])
    bank.remove(ids[0])
    bank.set_global("domain", small_adapter(9), version=4)
    bank.retrieve(ks[1], 0.9)
    bank.save()
    bank.save()  # a second version replaces the first
    again = TALoRA.load(tmp_path / "bank")
    assert again.patterns() == ids[1:]
    assert again.meta(ids[4]) == {"bank": "domain", "source": "doc4"}
    assert again.global_version == 4
    restored = again.global_adapter("domain")
    assert restored is not None
    torch.testing.assert_close(restored["model.transformer.blocks.0.q_proj.lora_A"],
                               torch.full((2, 8), 9.0))
    assert again.retrieve(ks[4], 0.5, top_k=1)[0][0] == ids[4]
    assert again.stats()["patterns"] == bank.stats()["patterns"]
    new = again.store(small_adapter(7), keys(1, seed=5)[0], {"bank": "fine"})
    assert new not in ids  # ids are never reused
    versions = [p.name for p in (tmp_path / "bank").iterdir() if p.name.startswith("v")]
    assert len(versions) == 1


def test_bank_at_a_relative_path_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `ruvdllm adapters list --bank bank`: a path relative to cwd
    bank = TALoRA("bank", DIM, CFG, capacity=8)
    pid = bank.store(small_adapter(1), keys(1)[0], {"bank": "fine"})
    bank.save()
    assert TALoRA.load("bank").patterns() == [pid]


@pytest.mark.parametrize("damage", ["index", "sqlite", "pointer", "adapters"])
def test_corrupt_folder_is_refused_and_left_unchanged(tmp_path, damage):
    root = tmp_path / "bank"
    bank = TALoRA(root, DIM, CFG)
    bank.store(small_adapter(1), keys(1)[0], {"bank": "fine"})
    bank.save()
    version = (root / "CURRENT").read_text().split()[0]
    target = {"index": root / version / "fine.hnsw", "sqlite": root / version / "bank.sqlite",
              "pointer": root / "CURRENT",
              "adapters": root / version / "adapters.safetensors"}[damage]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    if damage == "pointer":
        data = bytearray(b"v99999999\n")
    target.write_bytes(bytes(data))
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    with pytest.raises(BankError):
        TALoRA.load(root)
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_new_bank_over_existing_folder_is_refused(tmp_path):
    TALoRA(tmp_path, DIM, CFG).save()
    with pytest.raises(BankError, match="already holds"):
        TALoRA(tmp_path, DIM, CFG)
    with pytest.raises(BankError, match="no TALoRA bank"):
        TALoRA.load(tmp_path / "elsewhere")


def test_int8_storage_is_smaller_than_float():
    bank = TALoRA(None, DIM, LoRAConfig(rank=8, targets=("q_proj",)))
    adapter = {"model.transformer.blocks.0.q_proj.lora_A": torch.randn(8, 256),
               "model.transformer.blocks.0.q_proj.lora_B": torch.randn(256, 8)}
    bank.store(adapter, keys(1)[0], {"bank": "fine"})
    assert bank.stats()["compression"] > 2.5


def test_hook_mixes_globals_by_t_and_prefers_local_patterns():
    model = tiny_model()
    cfg = LoRAConfig(rank=2)
    lm = LoRAModel(model, cfg)
    bank = TALoRA(None, DIM, cfg)
    for i, b in enumerate(BANKS):
        bank.set_global(b, random_adapter(model, cfg, i), version=1)
    hook = TALoRAHook(bank, lm)
    assert hook.apply(0.5) == [("global:domain", 1.0)]
    mix = dict(hook.apply(0.7))
    assert mix == {"global:coarse": pytest.approx(0.5), "global:domain": pytest.approx(0.5)}
    k = keys(1)[0]
    pid = bank.store(random_adapter(model, cfg, 9), k, {"bank": "domain"})
    hook.query = k
    assert hook.apply(0.5) == [(f"local:{pid}", pytest.approx(1.0))]
    bank.set_global("fine", random_adapter(model, cfg, 5), version=2)
    hook.apply(0.1)
    fine = bank.global_adapter("fine")
    assert fine is not None
    b = "model.transformer.blocks.0.q_proj.lora_B"
    torch.testing.assert_close(lm.adapters["global:fine"][b], fine[b])


def test_cli_lists_exports_and_imports_a_global(tmp_path, capsys):
    from ruvdllm.cli import main

    root = str(tmp_path / "bank")
    bank = TALoRA(root, DIM, CFG)
    pid = bank.store(small_adapter(3), keys(1)[0], {"bank": "fine", "source": "docs"})
    bank.save()
    main(["adapters", "list", "--bank", root])
    assert '"source": "docs"' in capsys.readouterr().out
    main(["adapters", "export", str(tmp_path / "peft"), "--bank", root, "--id", str(pid)])
    main(["adapters", "import", str(tmp_path / "peft"), "--bank", root, "--global", "fine",
          "--version", "5"])
    again = TALoRA.load(root)
    assert again.global_version == 5 and again.patterns() == [pid]
    (tmp_path / "a_file").write_text("")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "d.txt").write_text("Some local text to learn from. " * 20)
    for args, message in (
            (["list", "--bank", str(tmp_path / "none")], "none"),
            (["train", str(tmp_path / "docs"), "--bank", str(tmp_path / "a_file"),
              "--steps", "1000"], "a_file: exists and is not a folder"),  # before training
            (["export", str(tmp_path / "a_file"), "--bank", root, "--id", str(pid)], "a_file"),
            (["import", str(tmp_path / "peft"), "--bank", root, "--global", "fine",
              "--version", "-1"], "version")):
        with pytest.raises(SystemExit) as exit_info:
            main(["adapters", *args])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, err
    assert (tmp_path / "a_file").read_text() == ""
    assert TALoRA.load(root).global_version == 5
