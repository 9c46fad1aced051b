"""DGR: denoising-guided retrieval and refinement, a sampler hook.

After every forward of the reverse process (DESIGN §4):

1. **Uncertainty** per answer position of the current span: normalised
   entropy ``H(p) / log V`` (0 = certain, 1 = uniform), or ``1 - (p1 - p2)``
   from the top-2 margin.
2. **Retrieval**: the positions above ``uncertain_threshold`` form the
   uncertain set; the mean of their final hidden states becomes the TALoRA
   query, so the next forward's adapter mix is chosen for what the model is
   still unsure about rather than for the prompt alone (the prompt embedding is
   kept as a fallback while nothing is uncertain).
3. **Refinement**: committed tokens whose confidence (the probability the
   model now gives them) has fallen below ``remask_threshold`` are masked again,
   at most ``max_remask`` per row per step and never at a block's last step,
   so the sampler's step budget still ends with every position committed.
   This is the remasking idea of ReMDM (Wang et al. 2025) restricted to tokens
   the model itself has come to doubt.

The hook is switched on and off with ``enabled`` and keeps counters in
``stats`` (steps, uncertain positions, re-masked tokens, retrievals).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ruvdllm.sampler import StepState
from ruvdllm.talora import TALoRAHook

Measure = Literal["entropy", "margin"]


@dataclass
class DGRConfig:
    enabled: bool = True
    measure: Measure = "entropy"
    uncertain_threshold: float = 0.5
    remask_threshold: float = 0.05
    max_remask: int = 1  # per row and step
    retrieve: bool = True

    def __post_init__(self) -> None:
        if self.measure not in ("entropy", "margin"):
            raise ValueError(f"unknown uncertainty measure {self.measure!r} (entropy or margin)")
        if not 0.0 <= self.uncertain_threshold <= 1.0 or not 0.0 <= self.remask_threshold <= 1.0:
            raise ValueError("DGR thresholds must be in [0, 1]")
        if self.max_remask < 0:
            raise ValueError(f"max_remask must be >= 0, got {self.max_remask}")


def uncertainty(logits: Tensor, measure: Measure = "entropy") -> Tensor:
    """Per-position uncertainty in [0, 1] from logits ``(..., V)``."""
    logp = F.log_softmax(logits.float(), dim=-1)
    if measure == "entropy":
        return -(logp.exp() * logp).sum(-1) / math.log(logits.shape[-1])
    top2 = logp.topk(2, dim=-1).values.exp()  # (..., 2)
    return 1.0 - (top2[..., 0] - top2[..., 1])


@dataclass
class DGRHook:
    """A SamplerHook; put it after the TALoRAHook whose ``query`` it steers."""

    cfg: DGRConfig = field(default_factory=DGRConfig)
    talora_hook: TALoRAHook | None = None
    stats: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("steps", "uncertain", "remasked", "retrievals"), 0))

    @property
    def enabled(self) -> bool:
        return self.cfg.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.cfg.enabled = value

    def before_forward(self, state: StepState) -> None:
        return None

    def after_forward(self, state: StepState) -> Tensor | None:
        """Steer the next query; return the committed positions to mask again."""
        if not self.cfg.enabled or state.logits is None or state.masked is None:
            return None
        lo, hi = state.span
        answer = torch.arange(lo, hi, device=state.x.device) >= state.answer_start  # (span,)
        u = uncertainty(state.logits, self.cfg.measure)  # (B, span)
        uncertain = (u > self.cfg.uncertain_threshold) & answer
        self.stats["steps"] += 1
        self.stats["uncertain"] += int(uncertain.sum())
        if (self.talora_hook is not None and self.cfg.retrieve and state.hidden is not None
                and bool(uncertain.any())):
            query = state.hidden[uncertain].float().mean(0)  # (d,)
            self.talora_hook.query = query.cpu().numpy()
            self.stats["retrievals"] += 1
        if state.last_step or self.cfg.max_remask == 0 or state.confidence is None:
            return None
        doubtful = ~state.masked & answer & (state.confidence < self.cfg.remask_threshold)
        if not bool(doubtful.any()):
            return None
        # keep the max_remask least confident doubtful positions of each row
        score = torch.where(doubtful, state.confidence, torch.inf)  # (B, span)
        rank = score.argsort(dim=1).argsort(dim=1)
        remask = doubtful & (rank < self.cfg.max_remask)
        self.stats["remasked"] += int(remask.sum())
        return remask
