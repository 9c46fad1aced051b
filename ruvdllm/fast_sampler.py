"""The GPU fast path of the reverse process: fixed-shape steps, device-side commits, graphs.

:class:`~ruvdllm.sampler.Sampler` is the readable reference: it reads its
decisions back to Python after every step (which positions were committed, is
the block finished?) and its tensors change shape from step to step. On a GPU
both cost more than the arithmetic of a small step. This sampler computes the
same answers (greedy, low-confidence remasking, LLaDA Alg. 4; Nie et al. 2025)
with Fast-dLLM's options (Wu et al. 2025: prefix and dual caches, confidence
threshold), organised so that a step is a fixed sequence of kernels:

* the sequence, its positions and every layer's keys/values live in buffers
  of fixed shape (:class:`~ruvdllm.model.StaticKV`); a step overwrites the
  slots it encodes (:meth:`~ruvdllm.model.DiffusionLM.forward_into`): the
  whole sequence at a block's first step (which refreshes both caches), the
  block alone (``dual``), or the block and everything after it (``prefix``);
  ``delayed`` encodes the whole sequence once, then the block alone, plus the
  block just committed at a block's first step
  (:meth:`~ruvdllm.sampler.Sampler._forward_delayed` states the approximation);
* the block is addressed by a device tensor (``lo``), so one captured graph
  serves every block of the dual and delayed caches (prefix steps, and every
  step under a ``suffix`` window, have one graph per block: their lengths differ);
* committing (top-k by confidence, threshold, EOS bookkeeping) is tensor
  arithmetic on the device: no ``.item()``, no ``nonzero`` inside a step;
* logits are computed for the block's rows only, and with 16-bit logits the greedy
  token and its probability come from one read of them
  (:func:`~ruvdllm.kernels.confidence.greedy_confidence`);
* on CUDA each block computes q/k/v and gate/up as one product each
  (:meth:`~ruvdllm.model.DiffusionLM.fuse_projections`);
* on CUDA each distinct step is captured once as a graph (:mod:`ruvdllm.cuda_graph`)
  and replayed. The host reads the device only between steps, and only when a
  threshold or early stop can end a block or the answer early (one flag read).

At fixed steps without a cache the answers equal the reference's; with caches
they differ where the reference's own cached path differs from its uncached one
(the bench reports token agreement). Temperature sampling, the repetition
penalty, random remasking and hooks are reference-only: they are refused here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ruvdllm.cuda_graph import GraphSteps
from ruvdllm.model import DiffusionLM, StaticKV, fused_kernels
from ruvdllm.sampler import (
    CacheMode,
    Sampler,
    SamplerConfig,
    SamplerError,
    left_pad,
    visible_end,
)

# full: every slot; dual: the block; prefix: the block and all after it;
# refresh: the block just committed and the block (the delayed cache's block start).
Phase = Literal["full", "dual", "prefix", "refresh"]


@dataclass
class _Plan:
    """Buffers of one problem shape (batch, prompt width, answer, block, options)."""

    key: tuple[object, ...]
    x: Tensor  # (B, L) tokens
    positions: Tensor  # (B, L)
    attn_mask: Tensor | None  # (B, 1, 1, L) key validity; None without left padding
    buffers: StaticKV
    slots: Tensor  # (L,) 0..L-1
    block_slots: Tensor  # (Tb,) 0..Tb-1
    window_slots: Tensor  # (2 Tb,) -Tb..Tb-1: the previous block and the block
    lo: Tensor  # () first slot of the current block
    steps_left: Tensor  # () steps left in the block, this one included
    done: Tensor  # (B,) rows finished (early stop)
    flags: Tensor  # (2,) [block still has masks, every row done]
    graphs: GraphSteps | None


class FastSampler:
    """Greedy answers of :class:`~ruvdllm.sampler.Sampler`, without per-step host work.

    ``graphs`` (default: on CUDA) captures each step as a CUDA graph. The
    buffers and graphs of the last problem shape are kept for the next call.
    """

    def __init__(self, model: DiffusionLM, graphs: bool | None = None) -> None:
        if model.config.causal:
            raise SamplerError("the fast sampler decodes diffusion models; this one is causal")
        self.model = model
        self.device = next(model.parameters()).device
        self.use_graphs = self.device.type == "cuda" if graphs is None else graphs
        if self.use_graphs and self.device.type != "cuda":
            raise SamplerError("CUDA graphs need the model on a CUDA device")
        if self.device.type == "cuda":  # one q/k/v and one gate/up product per block
            model.fuse_projections()
        self.plan: _Plan | None = None
        self.forwards = 0  # steps run by the last call (threshold/early stop lower it)

    @staticmethod
    def refusal(cfg: SamplerConfig) -> str | None:
        """Why ``cfg`` needs the reference sampler (an option only it has), or None."""
        if cfg.temperature != 0:
            return "the fast sampler is greedy (temperature 0); use the reference sampler"
        if cfg.repetition_penalty != 1.0:
            return "the fast sampler has no repetition penalty; use the reference sampler"
        if cfg.remasking != "low_confidence":
            return "the fast sampler remasks by low confidence only; use the reference sampler"
        return None

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], cfg: SamplerConfig) -> list[list[int]]:
        """Answer tokens per prompt, cut at the first EOS (as ``Sampler.generate``)."""
        mcfg = self.model.config
        if not prompts or any(not p for p in prompts):
            raise SamplerError("every prompt needs at least one token")
        cfg.validate(mcfg.max_sequence_length, max(len(p) for p in prompts), mcfg.logits_shift)
        refusal = self.refusal(cfg)
        if refusal is not None:
            raise SamplerError(refusal)
        plan = self._prepare(prompts, cfg)
        P = plan.x.shape[1] - cfg.gen_length
        n_blocks = cfg.gen_length // cfg.block_length
        per_block = cfg.steps // n_blocks
        self.forwards = 0
        finished = False
        for b in range(n_blocks):
            lo = P + b * cfg.block_length
            plan.lo.fill_(lo)
            for s in range(per_block):
                plan.steps_left.fill_(per_block - s)
                self._run(plan, self._phase(cfg.cache, b, s), lo, cfg)
                self.forwards += 1
                may_end_block = cfg.threshold is not None and s < per_block - 1
                if may_end_block or cfg.early_stop:
                    masked_left, all_done = plan.flags.tolist()  # the one read per step
                    finished = cfg.early_stop and all_done
                    if finished or not masked_left:
                        break
            if finished:
                break
        return [Sampler._cut(row, mcfg.eos_token_id, mcfg.mask_token_id)
                for row in plan.x[:, P:].tolist()]

    @staticmethod
    def _phase(cache: CacheMode, block: int, step: int) -> Phase:
        """What step ``step`` of block ``block`` encodes under ``cache``."""
        if cache == "none" or (step == 0 and (cache != "delayed" or block == 0)):
            return "full"
        if cache == "delayed":
            return "refresh" if step == 0 else "dual"
        return cache

    def _prepare(self, prompts: list[list[int]], cfg: SamplerConfig) -> _Plan:
        """The plan of this problem shape, its inputs set to ``prompts``."""
        mcfg, dev = self.model.config, self.device
        ids, pvalid = left_pad(prompts, mcfg.pad_token_id, dev)
        B, P = ids.shape
        G = cfg.gen_length
        x = torch.cat([ids, torch.full((B, G), mcfg.mask_token_id, dtype=torch.long,
                                       device=dev)], dim=1)  # (B, L)
        valid = torch.cat([pvalid, torch.ones(B, G, dtype=torch.bool, device=dev)], dim=1)
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)  # (B, L)
        padded = any(len(p) < P for p in prompts)
        key = (B, P, G, cfg.block_length, cfg.cache, cfg.threshold, cfg.early_stop, padded,
               cfg.suffix)
        plan = self.plan
        if plan is None or plan.key != key:
            self.plan = None  # free the old buffers and graphs before allocating new ones
            plan = self._new_plan(key, B, P + G, cfg.block_length, padded)
            self.plan = plan
        plan.x.copy_(x)
        plan.positions.copy_(positions)
        if plan.attn_mask is not None:
            plan.attn_mask.copy_(valid[:, None, None, :])
        plan.done.zero_()
        return plan

    def _new_plan(self, key: tuple[object, ...], B: int, L: int, Tb: int,
                  padded: bool) -> _Plan:
        dev = self.device
        dtype = self.model.transformer.ln_f.weight.dtype  # the float dtype (wte may be int4)
        x = torch.zeros(B, L, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        return _Plan(
            key=key, x=x, positions=torch.zeros(B, L, dtype=torch.long, device=dev),
            attn_mask=torch.ones(B, 1, 1, L, dtype=torch.bool, device=dev) if padded else None,
            buffers=StaticKV.empty(self.model.config, B, L, dtype, dev),
            slots=torch.arange(L, device=dev), block_slots=torch.arange(Tb, device=dev),
            window_slots=torch.arange(-Tb, Tb, device=dev),
            lo=torch.zeros((), dtype=torch.long, device=dev),
            steps_left=torch.ones((), dtype=torch.long, device=dev), done=done,
            flags=torch.zeros(2, dtype=torch.bool, device=dev),
            graphs=GraphSteps([x, done]) if self.use_graphs else None)

    def _run(self, plan: _Plan, phase: Phase, lo: int, cfg: SamplerConfig) -> None:
        def step() -> None:
            self._step(plan, phase, lo, cfg)

        if plan.graphs is None:
            step()
        else:  # prefix steps and suffix windows have lengths of their own per block
            per_block = phase == "prefix" or cfg.suffix is not None
            plan.graphs.run((phase, lo if per_block else None), step)

    def _step(self, plan: _Plan, phase: Phase, lo: int, cfg: SamplerConfig) -> None:
        """One denoising step, all on the device: forward, then commit."""
        model = self.model
        block = plan.lo + plan.block_slots  # (Tb,) slots of the current block
        Tb, L = block.shape[0], plan.x.shape[1]
        end = visible_end(lo + Tb, L, cfg.suffix)  # slots [0, end) are seen (suffix window)
        if phase == "full":  # every slot: refreshes the caches at a block's first step
            logits = model.forward_into(plan.x[:, :end], plan.positions[:, :end],
                                        plan.slots[:end], plan.buffers, plan.attn_mask, block,
                                        end)
        elif phase == "dual":  # the block alone; the other slots hold the cached keys
            logits = model.forward_into(plan.x.index_select(1, block),
                                        plan.positions.index_select(1, block), block,
                                        plan.buffers, plan.attn_mask, plan.block_slots, end)
        elif phase == "refresh":  # the block just committed and the block, over the cache
            window = plan.lo + plan.window_slots  # (2 Tb,)
            seen = max(visible_end(lo, L, cfg.suffix), lo + Tb)  # encoded by earlier steps
            if end > seen:  # and the slots that entered the suffix window
                window = torch.cat([window, plan.slots[seen:end]])
            logits = model.forward_into(plan.x.index_select(1, window),
                                        plan.positions.index_select(1, window), window,
                                        plan.buffers, plan.attn_mask, plan.block_slots + Tb,
                                        end)
        else:  # prefix: the block and everything after it, over the cached prefix
            logits = model.forward_into(plan.x[:, lo:end], plan.positions[:, lo:end],
                                        plan.slots[lo:end], plan.buffers, plan.attn_mask,
                                        plan.block_slots, end)
        self._commit(plan, logits, block, cfg)

    def _commit(self, plan: _Plan, logits: Tensor, block: Tensor, cfg: SamplerConfig) -> None:
        """Commit the block's most confident predictions in place (the reference's rule).

        ``k = ceil(masked / steps_left)`` positions per row, by descending
        confidence, plus any above the threshold; finished rows commit nothing.
        """
        mcfg = self.model.config
        mask_id = mcfg.mask_token_id
        tokens = plan.x.index_select(1, block)  # (B, Tb)
        masked = tokens == mask_id
        logits = logits[..., : mcfg.vocab_size]  # (B, Tb, V)
        if fused_kernels(logits):  # 16-bit CUDA: one read of the logits
            from ruvdllm.kernels.confidence import greedy_confidence  # Triton: CUDA only

            # only masked positions' confidence counts, and there the token is pred
            pred, confidence = greedy_confidence(logits)  # (B, Tb) each
        else:  # the reference's arithmetic (float32 runs emit its tokens exactly)
            pred = logits.argmax(-1)  # (B, Tb)
            probs = F.softmax(logits.float(), dim=-1)
            current = torch.where(masked, pred, tokens)
            confidence = probs.gather(-1, current[..., None]).squeeze(-1)  # (B, Tb)
        k = (masked.sum(1) + plan.steps_left - 1) // plan.steps_left  # (B,)
        score = torch.where(masked, confidence.double(), -torch.inf)  # (B, Tb)
        # Rank of each position in a stable descending sort, without a sort kernel:
        # the number of positions scoring higher, or equal and earlier.
        higher = score[:, None, :] > score[:, :, None]  # (B, Tb, Tb): [b, i, j] = s_j > s_i
        tie = (score[:, None, :] == score[:, :, None]).tril(-1)  # j < i with s_j == s_i
        rank = (higher | tie).sum(-1)  # (B, Tb)
        commit = masked & (rank < k[:, None])
        if cfg.threshold is not None:
            commit |= masked & (confidence > cfg.threshold)
        commit &= ~plan.done[:, None]
        new_tokens = torch.where(commit, pred, tokens)
        plan.x.index_copy_(1, block, new_tokens)
        if cfg.early_stop:
            P = plan.x.shape[1] - cfg.gen_length
            plan.done.copy_(Sampler._finished(plan.x, P, mask_id, mcfg.eos_token_id))
        plan.flags.copy_(torch.stack([(new_tokens == mask_id).any(), plan.done.all()]))
