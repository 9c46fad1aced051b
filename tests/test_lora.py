"""LoRA: identity at zero B, mixes are sums, merge round trip, quantized bases, PEFT, refusals."""

from __future__ import annotations

import json

import pytest
import torch

from ruvdllm.config import ModelConfig
from ruvdllm.lora import (
    LoRAConfig,
    LoRALinear,
    LoRAModel,
    base_view,
    export_peft,
    frozen_a,
    import_peft,
    key,
    zero_b,
)
from ruvdllm.model import DiffusionLM
from ruvdllm.quant import quantize_model


def tiny_model(seed: int = 0) -> DiffusionLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=64,
                      vocab_size=64, embedding_size=64, max_sequence_length=64)
    return DiffusionLM(cfg).eval()


def random_adapter(model: DiffusionLM, cfg: LoRAConfig, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    b = {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in zero_b(model, cfg).items()}
    return {**frozen_a(model, cfg, seed), **b}


def logits(model: DiffusionLM, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


X = torch.randint(4, 64, (2, 12), generator=torch.Generator().manual_seed(1))
ALL = LoRAConfig(targets=("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj",
                          "ff_out"))


def test_zero_b_is_the_base_model():
    model = tiny_model()
    ref = logits(model, X)
    lm = LoRAModel(model, ALL)
    lm.add("a", {**frozen_a(model, ALL, 3), **zero_b(model, ALL)})
    lm.set_mix([("a", 1.0)])
    torch.testing.assert_close(logits(model, X), ref, rtol=0, atol=0)


def test_mix_of_two_adapters_is_the_sum_of_their_updates():
    model = tiny_model()
    cfg = LoRAConfig(rank=4, alpha=8.0)
    a1, a2 = random_adapter(model, cfg, 1), random_adapter(model, cfg, 2)
    lm = LoRAModel(model, cfg)
    lm.add("one", a1)
    lm.add("two", a2)
    lm.set_mix([("one", 0.3), ("two", 0.7)])
    mixed = logits(model, X)
    lm.detach()
    # the same update by hand: W' = W + s (0.3 B1 A1 + 0.7 B2 A2)
    with torch.no_grad():
        for i, block in enumerate(model.transformer.blocks):
            for t in cfg.targets:
                delta = sum(w * a[key(i, t, "B")] @ a[key(i, t, "A")]
                            for w, a in ((0.3, a1), (0.7, a2)))
                getattr(block, t).weight += cfg.scaling * delta
    torch.testing.assert_close(mixed, logits(model, X), rtol=1e-4, atol=1e-4)


def test_set_mix_switches_without_rebuilding():
    model = tiny_model()
    lm = LoRAModel(model, LoRAConfig(rank=2))
    lm.add("one", random_adapter(model, lm.cfg, 1))
    lm.add("two", random_adapter(model, lm.cfg, 2))
    base = logits(model, X)
    lm.set_mix([("one", 1.0)])
    only_one = logits(model, X)
    a_cat = lm.wrapped[(0, "q_proj")].A_cat
    lm.set_mix([("two", 0.5), ("one", 0.0)])
    lm.set_mix([("one", 1.0)])
    assert lm.wrapped[(0, "q_proj")].A_cat is a_cat
    torch.testing.assert_close(logits(model, X), only_one)
    lm.set_mix([])
    torch.testing.assert_close(logits(model, X), base)


def test_merge_equals_mix_and_unmerge_restores():
    model = tiny_model()
    cfg = LoRAConfig(rank=4)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    lm = LoRAModel(model, cfg)
    lm.add("a", random_adapter(model, cfg, 5))
    lm.set_mix([("a", 0.5)])
    mixed = logits(model, X)
    lm.merge("a", 0.5)
    torch.testing.assert_close(logits(model, X), mixed, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="merged"):
        lm.set_mix([("a", 1.0)])
    lm.unmerge()
    lm.detach()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, original[k], rtol=0, atol=1e-6)


def test_quantized_base_is_wrapped_and_merge_is_refused():
    model = quantize_model(tiny_model(), "int8")
    cfg = LoRAConfig(rank=2)
    ref = logits(model, X)
    lm = LoRAModel(model, cfg)
    lm.add("a", random_adapter(model, cfg, 1))
    lm.set_mix([("a", 1.0)])
    assert not torch.allclose(logits(model, X), ref)
    with pytest.raises(ValueError, match="quantized"):
        lm.merge("a")


def test_detach_restores_modules_and_double_attach_is_refused():
    model = tiny_model()
    originals = [b.q_proj for b in model.transformer.blocks]
    lm = LoRAModel(model, LoRAConfig())
    assert isinstance(model.transformer.blocks[0].q_proj, LoRALinear)
    with pytest.raises(ValueError, match="already has LoRA"):
        LoRAModel(model, LoRAConfig())
    lm.detach()
    assert [b.q_proj for b in model.transformer.blocks] == originals


def test_base_view_shares_weights_without_wrappers():
    model = tiny_model()
    lm = LoRAModel(model, LoRAConfig(rank=2))
    lm.add("a", random_adapter(model, lm.cfg, 1))
    lm.set_mix([("a", 1.0)])
    twin = base_view(model)
    twin_q, q = twin.transformer.blocks[0].q_proj, model.transformer.blocks[0].q_proj
    assert isinstance(twin_q, torch.nn.Linear) and isinstance(q, LoRALinear)
    assert twin_q.weight.data_ptr() == q.base.weight.data_ptr()
    assert not any(p.requires_grad for p in twin.parameters())
    lm.detach()
    torch.testing.assert_close(logits(twin, X), logits(model, X))


def test_frozen_a_is_deterministic_per_seed():
    model = tiny_model()
    cfg = LoRAConfig()
    a, b, c = frozen_a(model, cfg, 7), frozen_a(model, cfg, 7), frozen_a(model, cfg, 8)
    assert all(k.endswith("lora_A") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[key(0, "q_proj", "A")], c[key(0, "q_proj", "A")])


def test_peft_round_trip(tmp_path):
    model = tiny_model()
    cfg = LoRAConfig(rank=4, alpha=4.0, targets=("q_proj", "v_proj"))
    adapter = random_adapter(model, cfg, 3)
    export_peft(adapter, cfg, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    back, back_cfg = import_peft(tmp_path / "peft")
    assert back_cfg == cfg
    assert set(back) == set(adapter)
    assert all(torch.equal(back[k], adapter[k]) for k in adapter)


def test_peft_refuses_unsupported_options(tmp_path):
    model = tiny_model()
    cfg = LoRAConfig(rank=2)
    export_peft(random_adapter(model, cfg, 1), cfg, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        import_peft(tmp_path)
    with pytest.raises(FileNotFoundError):
        import_peft(tmp_path / "missing")


@pytest.mark.parametrize("bad", ["wrong_shape", "unknown_target", "layer_out_of_range",
                                 "missing_b", "nan"])
def test_adapters_that_do_not_fit_are_refused(bad):
    model = tiny_model()
    cfg = LoRAConfig(rank=2)
    adapter = random_adapter(model, cfg, 1)
    qa = key(0, "q_proj", "A")
    if bad == "wrong_shape":
        adapter[qa] = torch.zeros(2, 31)
    elif bad == "unknown_target":
        adapter[key(0, "ff_proj", "A")] = torch.zeros(2, 32)
    elif bad == "layer_out_of_range":
        adapter[key(9, "q_proj", "A")] = torch.zeros(2, 32)
    elif bad == "missing_b":
        del adapter[key(0, "q_proj", "B")]
    else:
        adapter[qa] = torch.full((2, 32), float("nan"))
    lm = LoRAModel(model, cfg)
    with pytest.raises(ValueError):
        lm.add("bad", adapter)
    assert lm.ids == []


def test_bad_config_and_unknown_ids_are_refused():
    with pytest.raises(ValueError):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError):
        LoRAConfig(targets=("nope",))
    lm = LoRAModel(tiny_model(), LoRAConfig())
    with pytest.raises(ValueError, match="not loaded"):
        lm.set_mix([("x", 1.0)])
    with pytest.raises(ValueError, match="not loaded"):
        lm.remove("x")
