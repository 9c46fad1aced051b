"""What the coordinator aggregates: the LoRA B tensors of each TALoRA bank, and version 1.

Under FFA-LoRA (Sun et al. 2024, "Improving LoRA in Privacy-preserving Federated Learning")
every node derives the frozen A matrices from the announced `ffa_seed` and trains only B, so
the global state is, per bank ("coarse", "domain", "fine"), one B of shape (out, rank) per
adapted linear: ``model.transformer.blocks.{i}.{target}.lora_B``. The output sizes follow
the model's config.json (LLaDA keys, `ruvdllm.config.ModelConfig`); only the config is
read, never the weights. Version 1 is all-zero B, so the initial global adapter is a no-op
(B·A = 0) whatever A the seed yields.
"""

import secrets
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.store import Store, StoreError
from federation import BANKS, BankLayout, pack_adapter
from proto import ruvdllm_pb2 as pb
from ruvdllm.config import ModelConfig

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "attn_out")


def _out_features(cfg: ModelConfig) -> dict[str, int]:
    kv = cfg.n_kv_heads * cfg.head_dim
    return {
        "q_proj": cfg.d_model,
        "k_proj": kv,
        "v_proj": kv,
        "attn_out": cfg.d_model,
        "ff_proj": cfg.mlp_hidden_size,
        "up_proj": cfg.mlp_hidden_size,
        "ff_out": cfg.d_model,
    }


def lora_b_layout(
    model: str, rank: int, targets: Sequence[str] = DEFAULT_TARGETS
) -> dict[str, BankLayout]:
    """Per-bank layout of the B tensors for `model` (embedded name or checkpoint folder)."""
    from ruvdllm.checkpoint import resolve  # imports torch: only needed when initialising

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    cfg = ModelConfig.load(resolve(model) / "config.json")
    out = _out_features(cfg)
    if unknown := sorted(set(targets) - set(out)):
        raise ValueError(f"unknown LoRA targets {unknown}; choose from {sorted(out)}")
    if not targets:
        raise ValueError("at least one LoRA target is needed")
    shapes = {
        f"model.transformer.blocks.{i}.{t}.lora_B": (out[t], rank)
        for i in range(cfg.n_layers)
        for t in targets
    }
    return {bank: BankLayout(shapes) for bank in BANKS}


def initial_adapter(
    layout: dict[str, BankLayout], key: Ed25519PrivateKey, ffa_seed: int | None = None
) -> pb.MergedAdapter:
    """Version 1: all-zero B in every bank, a fresh FFA seed in [0, 2**63) (fits Flower ints)."""
    seed = secrets.randbelow(1 << 63) if ffa_seed is None else ffa_seed
    banks = {
        bank: {name: np.zeros(shape, np.float32) for name, shape in lay.shapes.items()}
        for bank, lay in layout.items()
    }
    return pack_adapter(
        banks, version=1, round=0, parent_version=0, ffa_seed=seed, contributors=[], key=key
    )


def ensure_initialised(
    store: Store, layout: dict[str, BankLayout], key: Ed25519PrivateKey
) -> bool:
    """Write version 1 into an empty store (True), or check the stored layout matches (False).

    A state folder made for another model, rank or target set is refused: its versions
    cannot be applied to this configuration.
    """
    if store.latest_version() is None:
        store.save_version(initial_adapter(layout, key), None)
        return True
    stored = store.layout()
    if {b: dict(v.shapes) for b, v in stored.items()} != {
        b: dict(v.shapes) for b, v in layout.items()
    }:
        raise StoreError(
            f"{store.root} holds adapters of another layout (model, rank or targets differ); "
            "use a new state folder"
        )
    return False
