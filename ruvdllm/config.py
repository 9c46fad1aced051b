"""Model configuration with LLaDA's public config keys.

A checkpoint's ``config.json`` is read into :class:`ModelConfig`. The field names
are LLaDA's (``d_model``, ``n_heads``, ``mlp_hidden_size``, ...), so the config of
LLaDA-8B loads unchanged; Dream's Qwen2-style keys (``hidden_size``,
``num_attention_heads``, ...) are translated on load. Unknown keys are kept
in ``extra`` so that saving a loaded config writes them back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

# Dream (Qwen2 layout) config key -> our (LLaDA) key.
_DREAM_KEYS = {
    "hidden_size": "d_model",
    "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads",
    "num_hidden_layers": "n_layers",
    "intermediate_size": "mlp_hidden_size",
    "max_position_embeddings": "max_sequence_length",
    "tie_word_embeddings": "weight_tying",
}


class ConfigError(ValueError):
    """A model config that cannot describe a valid model."""


@dataclass
class ModelConfig:
    """Shape and special tokens of a bidirectional Llama-style transformer.

    ``causal`` turns the same network into the autoregressive twin used for
    parity studies; ``logits_shift`` marks models (Dream) whose output at
    position ``i`` predicts token ``i + 1`` because they were adapted from an
    AR model. ``quantization`` records the weight-only scheme of a quantized
    checkpoint (see :mod:`ruvdllm.quant`).
    """

    d_model: int = 384
    n_heads: int = 6
    n_kv_heads: int = 6
    n_layers: int = 8
    mlp_hidden_size: int = 1024
    vocab_size: int = 8192
    embedding_size: int = 8192
    mask_token_id: int = 3
    eos_token_id: int = 2
    pad_token_id: int = 0
    bos_token_id: int | None = 1
    rope_theta: float = 10000.0
    max_sequence_length: int = 512
    rms_norm_eps: float = 1e-5
    residual_dropout: float = 0.0
    include_qkv_bias: bool = False
    weight_tying: bool = False
    causal: bool = False
    logits_shift: bool = False
    model_type: str = "llada"
    quantization: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size",
                     "vocab_size", "embedding_size", "max_sequence_length"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"config: {name} must be a positive integer")
        if not 0.0 <= self.residual_dropout < 1.0:
            raise ConfigError("config: residual_dropout must be in [0, 1)")
        if self.d_model % self.n_heads:
            raise ConfigError(f"config: d_model {self.d_model} is not divisible by "
                              f"n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"config: n_heads {self.n_heads} is not a multiple of "
                              f"n_kv_heads {self.n_kv_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError("config: head dimension must be even for RoPE")
        if self.embedding_size < self.vocab_size:
            raise ConfigError("config: embedding_size is smaller than vocab_size")
        if not 0 <= self.mask_token_id < self.embedding_size:
            raise ConfigError(f"config: mask_token_id {self.mask_token_id} is outside the "
                              f"embedding table ({self.embedding_size})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Build from LLaDA-style or Dream-style keys; unknown keys go to ``extra``."""
        data = dict(raw)
        if "d_model" not in data and "hidden_size" in data:  # Dream / Qwen2 layout
            for theirs, ours in _DREAM_KEYS.items():
                if theirs in data:
                    data[ours] = data.pop(theirs)
            data.setdefault("embedding_size", data.get("vocab_size"))
            data.setdefault("include_qkv_bias", True)
            data.setdefault("logits_shift", True)
        if data.get("n_kv_heads") is None:
            data["n_kv_heads"] = data.get("n_heads")
        if data.get("embedding_size") is None:
            data["embedding_size"] = data.get("vocab_size")
        if data.get("pad_token_id") is None:
            data["pad_token_id"] = data.get("eos_token_id", 0)
        if data.get("mlp_hidden_size") is None and "mlp_ratio" in data and "d_model" in data:
            data["mlp_hidden_size"] = int(data["mlp_ratio"]) * int(data["d_model"])
        known = {f.name for f in fields(cls)} - {"extra"}
        missing = [k for k in ("d_model", "n_heads", "n_layers", "vocab_size", "mask_token_id")
                   if k not in data]
        if missing:
            raise ConfigError(f"config: missing required keys {missing}")
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known and k != "extra"}
        try:
            return cls(**kwargs, extra=extra)
        except TypeError as err:
            raise ConfigError(f"config: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """LLaDA-compatible dict (extra keys first, so ours win)."""
        out = dict(self.extra)
        out.update({k: v for k, v in asdict(self).items() if k != "extra"})
        out.setdefault("architectures", ["LLaDAModelLM"])
        out.setdefault("block_type", "llama")
        out.setdefault("layer_norm_type", "rms")
        out.setdefault("activation_type", "silu")
        out.setdefault("rope", True)
        out.setdefault("include_bias", False)
        return out

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(raw)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
