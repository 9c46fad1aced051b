"""Reverse process of masked diffusion: fill an all-``[MASK]`` answer step by step.

Reference (LLaDA, Nie et al. 2025, Alg. 4 "low-confidence remasking"): the
answer is split into semi-autoregressive blocks; every step predicts all masked
positions of the current block and commits the ``k`` most confident, where
``k`` spreads the block's masks evenly over its steps. Temperature sampling
perturbs logits with Gumbel noise in float64.

Fast path (Fast-dLLM, Wu et al. 2025) on top of the same loop:

* ``threshold``: commit every masked position whose confidence exceeds it
  (never fewer than the schedule's ``k``, so ``steps`` stays an upper bound);
* ``cache="prefix"``: keys/values of everything before the block are computed
  once per block and reused; ``cache="dual"`` also caches the positions after
  the block, so a step encodes only the block's tokens;
* ``cache="delayed"``: the dual cache without its per-block re-encoding of the
  whole sequence (see :meth:`Sampler._forward_delayed`);
* ``early_stop``: a row is finished once an EOS and everything before it are
  committed; the loop ends when every row is.

``suffix`` (DPad's suffix dropout, Chen et al. 2025) cuts the masked positions
after the block to the nearest ``suffix``: a step sees the prompt, the answer up
to the block's end and that many masks, never the rest. Far masks carry little
the block needs (measured: docs/decisions.md), and without them the answer's
first step encodes the prompt and one block instead of the whole sequence.

The timestep ``t`` of a row is the fraction of its answer still masked, the
definition of DESIGN §3, so hooks (TALoRA, DGR) see the same ``t`` whatever the
schedule. Rows are left-padded and attend only to their own tokens with
positions counted from their first real token, so a row's greedy output does
not depend on the batch it is in.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from ruvdllm.model import DiffusionLM, KVCache

CacheMode = Literal["none", "prefix", "dual", "delayed"]


class SamplerError(ValueError):
    """Sampling options that cannot work together."""


@dataclass
class SamplerConfig:
    steps: int = 64
    gen_length: int = 64
    block_length: int = 32
    temperature: float = 0.0
    repetition_penalty: float = 1.0
    remasking: Literal["low_confidence", "random"] = "low_confidence"
    threshold: float | None = None
    cache: CacheMode = "none"
    early_stop: bool = False
    seed: int = 0
    suffix: int | None = None  # masked positions seen after the block; None: all

    def validate(self, max_len: int, prompt_len: int, logits_shift: bool = False) -> None:
        if self.gen_length <= 0 or self.block_length <= 0 or self.steps <= 0:
            raise SamplerError("steps, gen-length and block-length must be positive")
        if self.gen_length % self.block_length:
            raise SamplerError(f"gen-length {self.gen_length} is not divisible by "
                               f"block-length {self.block_length}")
        blocks = self.gen_length // self.block_length
        if self.steps < blocks:
            raise SamplerError(f"steps {self.steps} is fewer than the {blocks} blocks")
        if self.steps % blocks:
            raise SamplerError(f"steps {self.steps} is not a multiple of the {blocks} blocks")
        if self.remasking not in ("low_confidence", "random"):
            raise SamplerError(f"unknown remasking {self.remasking!r}")
        if self.cache not in ("none", "prefix", "dual", "delayed"):
            raise SamplerError(f"unknown cache mode {self.cache!r}")
        if self.threshold is not None and not 0.0 < self.threshold <= 1.0:
            raise SamplerError("threshold must be in (0, 1]")
        if self.suffix is not None and self.suffix < 0:
            raise SamplerError(f"suffix must be >= 0 masked positions, got {self.suffix}")
        if logits_shift and self.cache != "none":
            raise SamplerError("caches need the model's own logits at each position; this "
                               "model shifts logits (Dream), use cache='none'")
        check_sampling(self.temperature, self.repetition_penalty)
        if prompt_len + self.gen_length > max_len:
            raise SamplerError(f"prompt ({prompt_len} tokens) + gen-length ({self.gen_length}) "
                               f"exceeds max_sequence_length {max_len}")


def check_sampling(temperature: float, repetition_penalty: float) -> None:
    """Refuse a temperature or repetition penalty no sampler can use (NaN included)."""
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise SamplerError(f"temperature must be a finite number >= 0, got {temperature}")
    if not (repetition_penalty >= 1.0 and math.isfinite(repetition_penalty)):
        raise SamplerError(f"repetition_penalty must be a finite number >= 1 (1 = off), got "
                           f"{repetition_penalty}")


@dataclass
class StepState:
    """What a hook sees at one denoising step.

    ``span`` is the absolute ``[start, end)`` range of ``x`` covered by
    ``logits``/``hidden``/``confidence`` (the current block with caches, the
    whole sequence without). ``confidence`` is the probability the model gives
    to the current token at committed positions and to its prediction at masked
    ones.
    """

    step: int
    last_step: bool
    t: Tensor  # (B,) fraction of the answer still masked
    x: Tensor  # (B, L)
    answer_start: int
    span: tuple[int, int]
    logits: Tensor | None = None  # (B, span, V)
    hidden: Tensor | None = None  # (B, span, d)
    confidence: Tensor | None = None  # (B, span)
    masked: Tensor | None = None  # (B, span) bool, before this step's commits


class SamplerHook(Protocol):
    """Sees every step; may change the model's adapter mix and re-mask positions."""

    def before_forward(self, state: StepState) -> None: ...

    def after_forward(self, state: StepState) -> Tensor | None:
        """Return a bool ``(B, span)`` of committed positions to mask again, or None."""
        ...


@dataclass
class StepEvent:
    """Tokens committed (and re-masked) at one step, per row, absolute positions."""

    step: int
    committed: list[list[tuple[int, int]]]  # row -> [(position, token)]
    remasked: list[list[int]] = field(default_factory=list)
    done: list[bool] = field(default_factory=list)


class AnswerTracker:
    """One row's answer rebuilt from step events, for streaming text in order.

    Diffusion commits tokens anywhere in a block; a reader wants text in order,
    so ``prefix`` is the run of committed tokens from the answer's start, cut at
    the first EOS (``ended`` tells whether one was reached).
    """

    def __init__(self, answer_start: int, gen_length: int, mask_id: int, eos_id: int) -> None:
        self.start, self.mask_id, self.eos_id = answer_start, mask_id, eos_id
        self.answer = [mask_id] * gen_length
        self.prefix: list[int] = []
        self.ended = False

    def apply(self, event: StepEvent, row: int = 0) -> list[int]:
        """Take one step's commits and re-masks; return the new ``prefix``."""
        for pos, tok in event.committed[row]:
            self.answer[pos - self.start] = tok
        for pos in event.remasked[row] if event.remasked else []:
            self.answer[pos - self.start] = self.mask_id
        a = self.answer
        prefix = a[: a.index(self.mask_id)] if self.mask_id in a else a
        self.ended = self.eos_id in prefix
        self.prefix = prefix[: prefix.index(self.eos_id)] if self.ended else prefix
        return self.prefix


def gumbel_perturb(logits: Tensor, temperature: float, gen: torch.Generator | None) -> Tensor:
    """Scores whose argmax samples softmax(logits / T) (Gumbel-max, in float64).

    Low-precision Gumbel noise measurably hurts masked-diffusion sampling
    (LLaDA's note), hence float64.
    """
    if temperature == 0:
        return logits
    logits = logits.double()
    u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=gen)
    return logits / temperature - torch.log(-torch.log(u.clamp_min(1e-300)))


def penalize_repeats(logits: Tensor, x: Tensor, penalty: float, special: list[int]) -> Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019) over the tokens already in each row.

    Logits ``(B, T, V)`` of tokens present in ``x`` ``(B, L)`` (specials excepted)
    are divided by ``penalty`` when positive and multiplied when negative. Small
    diffusion LMs fill blocks with loops of one phrase; this is the measured
    remedy (docs/model_card.md).
    """
    V = logits.shape[-1]
    seen = torch.zeros(x.shape[0], V, dtype=torch.bool, device=x.device)
    seen.scatter_(1, x.clamp(max=V - 1), True)
    seen[:, special] = False
    seen = seen[:, None, :]  # (B, 1, V)
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def visible_end(hi: int, length: int, suffix: int | None) -> int:
    """End of what a step of the block ending at ``hi`` sees: ``suffix`` masks past it."""
    return length if suffix is None else min(length, hi + suffix)


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(B, P)`` ids and validity mask for prompts left-padded to the longest."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
            valid[i, width - len(p):] = True
    return ids, valid


class Sampler:
    """Generates answers for token prompts with one model; see the module docstring."""

    def __init__(self, model: DiffusionLM, hooks: list[SamplerHook] | None = None) -> None:
        self.model = model
        self.hooks = list(hooks or [])

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], cfg: SamplerConfig) -> list[list[int]]:
        """Answer tokens per prompt, cut at the first EOS."""
        events = self.stream(prompts, cfg)
        for _ in events:
            pass
        return self.answers

    @torch.no_grad()
    def stream(self, prompts: list[list[int]], cfg: SamplerConfig) -> Iterator[StepEvent]:
        """Run the reverse process, yielding the tokens committed at every step.

        After exhaustion ``self.answers`` holds the answer tokens per prompt.
        """
        mcfg = self.model.config
        if mcfg.causal:
            raise SamplerError("a causal model (an AR twin) cannot fill masked blocks; decode it "
                               "left to right (ruvdllm.ar, as Runtime.generate does)")
        if not prompts or any(not p for p in prompts):
            raise SamplerError("every prompt needs at least one token")
        cfg.validate(mcfg.max_sequence_length, max(len(p) for p in prompts), mcfg.logits_shift)
        dev = next(self.model.parameters()).device
        gen = torch.Generator(device=dev).manual_seed(cfg.seed)
        mask_id, eos_id = mcfg.mask_token_id, mcfg.eos_token_id

        ids, pvalid = left_pad(prompts, mcfg.pad_token_id, dev)
        B, P = ids.shape
        G = cfg.gen_length
        x = torch.cat([ids, torch.full((B, G), mask_id, dtype=torch.long, device=dev)], dim=1)
        valid = torch.cat([pvalid, torch.ones(B, G, dtype=torch.bool, device=dev)], dim=1)
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)  # (B, L)
        n_blocks = G // cfg.block_length
        steps_per_block = cfg.steps // n_blocks
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        step = 0
        cache: KVCache | None = None
        for b in range(n_blocks):
            lo, hi = P + b * cfg.block_length, P + (b + 1) * cfg.block_length
            end = visible_end(hi, x.shape[1], cfg.suffix)  # what this block's steps see
            if cfg.cache != "delayed":  # the delayed cache lives across blocks
                cache = None
            for s in range(steps_per_block):
                last = s == steps_per_block - 1
                block_masked = x[:, lo:hi] == mask_id  # (B, Tb)
                if not block_masked.any():
                    break
                state = StepState(step=step, last_step=last,
                                  t=(x[:, P:] == mask_id).float().mean(1), x=x,
                                  answer_start=P, span=(lo, hi))
                for hook in self.hooks:
                    hook.before_forward(state)
                logits, hidden, cache = self._forward(x[:, :end], valid[:, :end],
                                                      positions[:, :end], lo, hi, cache, cfg,
                                                      first_step=s == 0)
                committed, remasked = self._step(x, logits, hidden, state, block_masked,
                                                 steps_per_block - s, cfg, gen, done)
                if cfg.early_stop:
                    done = self._finished(x, P, mask_id, eos_id)
                yield StepEvent(step=step, committed=committed, remasked=remasked,
                                done=done.tolist())
                step += 1
                if cfg.early_stop and bool(done.all()):
                    break
            if cfg.early_stop and bool(done.all()):
                break
        self.answers = [self._cut(row.tolist(), eos_id, mask_id) for row in x[:, P:]]

    def _forward(
        self, x: Tensor, valid: Tensor, positions: Tensor, lo: int, hi: int,
        cache: KVCache | None, cfg: SamplerConfig, first_step: bool = False,
    ) -> tuple[Tensor, Tensor, KVCache | None]:
        """Logits and hidden states of the block ``[lo, hi)``: (B, Tb, V), (B, Tb, d)."""
        model = self.model
        if cfg.cache == "delayed" and cache is not None:
            return self._forward_delayed(x, valid, positions, lo, hi, cache, first_step)
        if cfg.cache == "none" or cache is None:
            out = model(x, positions=positions, valid=valid, return_hidden=True,
                        return_cache=cfg.cache != "none", logits_slice=slice(lo, hi))
            assert out.hidden is not None
            kept = None
            if out.cache is not None:  # refresh at the block boundary
                L = x.shape[1]
                if cfg.cache == "delayed":  # every position, in sequence order
                    return out.logits, out.hidden[:, lo:hi], out.cache
                keep = torch.arange(lo, device=x.device) if cfg.cache == "prefix" else (
                    torch.cat([torch.arange(lo, device=x.device),
                               torch.arange(hi, L, device=x.device)]))
                kept = out.cache.select(keep)
            return out.logits, out.hidden[:, lo:hi], kept
        end = x.shape[1] if cfg.cache == "prefix" else hi
        out = model(x[:, lo:end], positions=positions[:, lo:end], valid=valid[:, lo:end],
                    cache=cache, return_hidden=True, logits_slice=slice(0, hi - lo))
        assert out.hidden is not None
        return out.logits, out.hidden[:, : hi - lo], cache

    def _forward_delayed(
        self, x: Tensor, valid: Tensor, positions: Tensor, lo: int, hi: int, cache: KVCache,
        first_step: bool,
    ) -> tuple[Tensor, Tensor, KVCache]:
        """``cache="delayed"``: encode the block over keys/values cached at the first step.

        Fast-dLLM's dual cache (Wu et al. 2025) re-encodes the whole sequence at
        every block's first step. Here the whole sequence is encoded once (the
        answer's first step); afterwards a step encodes the block alone, and a
        block's first step also re-encodes the block just committed, so its
        keys/values stop being those of masks: caching a decoded token one step
        late, as dKV-Cache's delayed caching (Ma et al. 2025) does, and the
        lazy, partial refreshes of dLLM-Cache (Liu et al. 2025) and dInfer
        (inclusionAI 2025). Approximation: the prompt's and the masked suffix's
        keys/values are those of the first step (they never see a committed
        answer token), and a committed block's are refreshed once, when the next
        block starts (they never see later blocks). ``cache`` holds every
        position encoded so far, in sequence order; the encoded slots are
        overwritten. With a ``suffix`` window, ``x`` ends where this block's
        window ends and a block's first step also encodes the positions that
        entered the window since the last block.
        """
        L, seen, Tb = x.shape[1], cache.length, hi - lo
        start = lo - Tb if first_step else lo
        dev = x.device
        encode = torch.cat([torch.arange(start, hi, device=dev),
                            torch.arange(max(seen, hi), L, device=dev)])  # new positions last
        rest = torch.cat([torch.arange(start, device=dev),
                          torch.arange(hi, max(seen, hi), device=dev)])
        out = self.model(x[:, encode], positions=positions[:, encode], valid=valid[:, encode],
                         cache=cache.select(rest), return_cache=True, return_hidden=True,
                         logits_slice=slice(lo - start, hi - start))
        assert out.hidden is not None and out.cache is not None
        T = encode.shape[0]
        slots: list[Tensor] = []
        for full, fresh in zip([*cache.keys, *cache.values],
                               [*out.cache.keys, *out.cache.values], strict=True):
            if seen < L:  # room for the positions that entered the window
                full = F.pad(full, (0, 0, 0, L - seen))  # (B, Hkv, L, hd)
            full[:, :, encode] = fresh[:, :, -T:]  # the encoded slots
            slots.append(full)
        n = len(cache.keys)
        return out.logits, out.hidden[:, lo - start: hi - start], KVCache(
            slots[:n], slots[n:], positions, valid)

    def _step(
        self, x: Tensor, logits: Tensor, hidden: Tensor, state: StepState,
        block_masked: Tensor, steps_left: int, cfg: SamplerConfig,
        gen: torch.Generator, done: Tensor,
    ) -> tuple[list[list[tuple[int, int]]], list[list[int]]]:
        lo, hi = state.span
        mcfg = self.model.config
        logits = logits[..., : mcfg.vocab_size]
        if cfg.repetition_penalty != 1.0:
            special = [mcfg.mask_token_id, mcfg.pad_token_id, mcfg.eos_token_id]
            logits = penalize_repeats(logits, x, cfg.repetition_penalty, special)
        pred = gumbel_perturb(logits, cfg.temperature, gen).argmax(-1)  # (B, Tb)
        probs = F.softmax(logits.float(), dim=-1)
        current = torch.where(block_masked, pred, x[:, lo:hi])
        confidence = probs.gather(-1, current[..., None]).squeeze(-1)  # (B, Tb)
        if cfg.remasking == "random":
            score = torch.rand(pred.shape, device=x.device, generator=gen)
        else:
            score = confidence
        state.logits, state.hidden, state.confidence = logits, hidden, confidence
        state.masked = block_masked

        remask = torch.zeros_like(block_masked)
        for hook in self.hooks:
            asked = hook.after_forward(state)
            if asked is not None and not state.last_step:
                remask |= asked & ~block_masked
        # Commit the k most confident masked positions, k = ceil(masked / steps left);
        # this equals LLaDA's even split with the remainder on the first steps.
        n_masked = block_masked.sum(1)  # (B,)
        k = (n_masked + steps_left - 1) // steps_left
        score = torch.where(block_masked, score.double(), -torch.inf)
        order = score.argsort(dim=1, descending=True)
        rank = order.argsort(dim=1)  # (B, Tb) rank of each position
        commit = block_masked & (rank < k[:, None])
        if cfg.threshold is not None:
            commit |= block_masked & (confidence > cfg.threshold)
        commit &= ~done[:, None]
        block = x[:, lo:hi]
        block[commit] = pred[commit]
        block[remask] = mcfg.mask_token_id
        committed = [[(lo + int(i), int(block[r, i])) for i in commit[r].nonzero().flatten()]
                     for r in range(x.shape[0])]
        remasked = [[lo + int(i) for i in remask[r].nonzero().flatten()]
                    for r in range(x.shape[0])]
        return committed, remasked

    @staticmethod
    def _finished(x: Tensor, P: int, mask_id: int, eos_id: int) -> Tensor:
        """(B,) rows whose answer has an EOS with nothing masked before it."""
        ans = x[:, P:]
        is_eos = ans == eos_id
        first_eos = torch.where(is_eos.any(1), is_eos.float().argmax(1), ans.shape[1])
        idx = torch.arange(ans.shape[1], device=x.device)[None]
        masked_before = ((ans == mask_id) & (idx < first_eos[:, None])).any(1)
        return is_eos.any(1) & ~masked_before

    @staticmethod
    def _cut(row: list[int], eos_id: int, mask_id: int) -> list[int]:
        if eos_id in row:
            row = row[: row.index(eos_id)]
        return [tok for tok in row if tok != mask_id]
