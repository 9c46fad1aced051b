"""Held-out perplexity of the model under a merged adapter version, with TALoRA's mix per t.

The federated adapters are timestep-aware: which bank acts depends on the fraction ``t`` of
the answer still masked. ``ruvdllm.evaluate.perplexity`` calls the bare model, so it would
not see them; this estimator is the same masked-diffusion ELBO bound (LLaDA eq. 3) with ``t``
fixed per pass at the midpoints ``(k + ½)/K`` of K strata, and the TALoRA mix for that ``t``
set before each pass — exactly what the sampler's hook does at generation time. Masks and
windows come from a fixed seed, so two versions are scored on the same noise and their
difference is the adapters'.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from federation import unpack_adapter
from node_agent.adapters import Version, bank_adapter
from proto import ruvdllm_pb2 as pb
from ruvdllm.evaluate import windows
from ruvdllm.lora import LoRAConfig, LoRAModel, frozen_a
from ruvdllm.model import DiffusionLM
from ruvdllm.talora import BANKS, TALoRA, TALoRAHook
from ruvdllm.tokenizer import Tokenizer
from ruvdllm.train import token_stream


class HeldoutScorer:
    """Scores texts under successive adapter versions on one model (LoRA attached once)."""

    def __init__(self, model: DiffusionLM, tokenizer: Tokenizer, lora: LoRAConfig,
                 coordinator_key: Ed25519PublicKey) -> None:
        self.model, self.tokenizer, self.lora = model, tokenizer, lora
        self.coordinator_key = coordinator_key
        self.talora = TALoRA(None, model.config.d_model, lora)
        self.hook = TALoRAHook(self.talora, LoRAModel(model, lora))

    def use(self, message: pb.MergedAdapter) -> None:
        """Verify a merged version (coordinator signature) and put it in the global slots."""
        banks = unpack_adapter(message, self.coordinator_key)
        version = Version(message.version, bytes(message.sha256), message.ffa_seed, banks)
        frozen = frozen_a(self.model, self.lora, message.ffa_seed)
        for bank in BANKS:
            self.talora.set_global(bank, bank_adapter(frozen, version, bank), message.version)

    @torch.no_grad()
    def perplexity(self, texts: list[str], seq_len: int = 128, max_tokens: int = 2048,
                   samples: int = 4, seed: int = 0, batch_size: int = 16) -> float:
        """exp(ELBO bound on the per-token NLL) of ``texts`` under the current version."""
        x0 = windows(token_stream(texts, self.tokenizer), seq_len, max_tokens)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.rand((samples, *x0.shape), generator=gen)
        mask_id, vocab = self.model.config.mask_token_id, self.model.config.vocab_size
        total = 0.0
        self.model.eval()
        for k in range(samples):
            t = (k + 0.5) / samples
            self.hook.apply(t)
            for i in range(0, len(x0), batch_size):
                x = x0[i:i + batch_size]
                masked = noise[k, i:i + batch_size] < t
                logits = self.model(torch.where(masked, mask_id, x)).logits[..., :vocab]
                nll = F.cross_entropy(logits.float().transpose(1, 2), x, reduction="none")
                total += float((nll * masked).sum()) / t
        return math.exp(total / (samples * x0.numel()))
