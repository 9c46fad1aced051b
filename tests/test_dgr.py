"""DGR: uncertainty measures, re-masking rules (committed only, bounded, never last), steering."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ruvdllm.dgr import DGRConfig, DGRHook, uncertainty
from ruvdllm.lora import LoRAConfig, LoRAModel
from ruvdllm.sampler import Sampler, SamplerConfig, StepState
from ruvdllm.talora import TALoRA, TALoRAHook
from tests.test_lora import random_adapter, tiny_model


def state(confidence: list[list[float]], masked: list[list[bool]], *, last: bool = False,
          answer_start: int = 0, logits: torch.Tensor | None = None) -> StepState:
    conf = torch.tensor(confidence)
    B, T = conf.shape
    return StepState(step=0, last_step=last, t=torch.full((B,), 0.5),
                     x=torch.zeros(B, T, dtype=torch.long), answer_start=answer_start,
                     span=(0, T), logits=logits if logits is not None else torch.zeros(B, T, 8),
                     hidden=torch.ones(B, T, 4), confidence=conf,
                     masked=torch.tensor(masked))


def test_uncertainty_measures():
    uniform, sharp = torch.zeros(10), torch.tensor([20.0] + [0.0] * 9)
    u = uncertainty(torch.stack([uniform, sharp]))
    assert u[0] == pytest.approx(1.0) and u[1] < 0.01
    m = uncertainty(torch.stack([uniform, sharp]), "margin")
    assert m[0] == pytest.approx(1.0) and m[1] < 0.01
    two = torch.tensor([math.log(3.0), 0.0] + [-1e9] * 8)  # p = 0.75, 0.25
    assert uncertainty(two, "margin") == pytest.approx(0.5, abs=1e-5)


def test_remasks_only_committed_low_confidence_positions_bounded():
    hook = DGRHook(DGRConfig(remask_threshold=0.1, max_remask=1))
    s = state([[0.01, 0.02, 0.9, 0.05], [0.5, 0.01, 0.9, 0.9]],
              [[True, False, False, False], [False, False, False, True]])
    remask = hook.after_forward(s)
    assert remask is not None
    # row 0: position 0 is masked (never re-masked); of 1 and 3 the least confident
    assert remask.tolist() == [[False, True, False, False], [False, True, False, False]]
    assert hook.stats["remasked"] == 2


def test_never_at_the_last_step_nor_in_the_prompt_nor_when_off():
    s = state([[0.01, 0.01, 0.01]], [[False, False, False]])
    assert DGRHook(DGRConfig(remask_threshold=0.1)).after_forward(
        state([[0.01, 0.01, 0.01]], [[False, False, False]], last=True)) is None
    in_prompt = DGRHook(DGRConfig(remask_threshold=0.1, max_remask=5)).after_forward(
        state([[0.01, 0.01, 0.01]], [[False, False, False]], answer_start=2))
    assert in_prompt is not None and in_prompt.tolist() == [[False, False, True]]
    off = DGRHook(DGRConfig(enabled=False, remask_threshold=0.1))
    assert off.after_forward(s) is None and off.stats["steps"] == 0


def test_uncertain_positions_steer_the_talora_query():
    model = tiny_model()
    cfg = LoRAConfig(rank=2)
    bank = TALoRA(None, 4, cfg)
    hook = TALoRAHook(bank, LoRAModel(model, cfg), query=np.zeros(4, dtype=np.float32))
    dgr = DGRHook(DGRConfig(uncertain_threshold=0.5), talora_hook=hook)
    dgr.after_forward(state([[0.9, 0.9]], [[True, True]]))  # zero logits: all uncertain
    assert hook.query is not None and np.allclose(hook.query, 1.0)
    assert dgr.stats["retrievals"] == 1


def test_sampler_with_dgr_commits_everything():
    model = tiny_model()
    cfg = LoRAConfig(rank=2)
    lm = LoRAModel(model, cfg)
    bank = TALoRA(None, 32, cfg)
    bank.set_global("domain", random_adapter(model, cfg, 1), 1)
    pid = bank.store(random_adapter(model, cfg, 2), np.ones(32), {"bank": "coarse"})
    th = TALoRAHook(bank, lm, query=np.ones(32, dtype=np.float32))
    dgr = DGRHook(DGRConfig(remask_threshold=0.5, max_remask=2), talora_hook=th)
    sampler = Sampler(model, [th, dgr])
    x = [[5, 6, 7]]
    out = sampler.generate(x, SamplerConfig(steps=8, gen_length=8, block_length=8))
    assert len(out[0]) <= 8 and model.config.mask_token_id not in out[0]
    assert dgr.stats["steps"] >= 8 and dgr.stats["remasked"] > 0
    assert f"local:{pid}" in lm.adapters  # the first step (t = 1) used the coarse pattern
