"""Independent of ruvdllm: write tiny checkpoints in LLaDA's and Dream's published
layouts using only json + safetensors, and compute their logits with plain numpy.

This is the yardstick the loader is checked against: nothing here imports the
project, so a naming or math mistake in ruvdllm cannot hide in both places.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

TOKENIZER = Path(__file__).resolve().parent.parent / "ruvdllm" / "assets" / "tokenizer.json"

# The keys of LLaDA-8B-Instruct's config.json, at a tiny size.
LLADA_CONFIG = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"], "attention_dropout": 0.0,
    "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                 "AutoModel": "modeling_llada.LLaDAModelLM"},
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama",
    "d_model": 32, "embedding_dropout": 0.0, "embedding_size": 8192, "eos_token_id": 2,
    "flash_attention": False, "include_bias": False, "include_qkv_bias": False,
    "init_cutoff_factor": None, "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02,
    "input_emb_norm": False, "layer_norm_type": "rms", "layer_norm_with_affine": True,
    "mask_token_id": 3, "max_sequence_length": 256, "mlp_hidden_size": 48, "mlp_ratio": 4,
    "model_type": "llada", "multi_query_attention": None, "n_heads": 4, "n_kv_heads": 2,
    "n_layers": 2, "pad_token_id": 0, "precision": "amp_bf16", "residual_dropout": 0.0,
    "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True, "rope_theta": 500000.0,
    "scale_logits": False, "use_cache": False, "vocab_size": 8192, "weight_tying": False,
}

DREAM_CONFIG = {
    "architectures": ["DreamModel"], "model_type": "Dream", "hidden_size": 32,
    "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2,
    "num_hidden_layers": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0, "tie_word_embeddings": False, "vocab_size": 8192,
    "mask_token_id": 3, "eos_token_id": 2, "pad_token_id": 0, "bos_token_id": 1,
}


def random_llada_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d, h, kv, ff = cfg["d_model"], cfg["n_heads"], cfg["n_kv_heads"], cfg["mlp_hidden_size"]
    hd = d // h

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    t = {"model.transformer.wte.weight": w(cfg["embedding_size"], d),
         "model.transformer.ln_f.weight": 1 + w(d),
         "model.transformer.ff_out.weight": w(cfg["embedding_size"], d)}
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        t |= {p + "attn_norm.weight": 1 + w(d), p + "q_proj.weight": w(d, d),
              p + "k_proj.weight": w(kv * hd, d), p + "v_proj.weight": w(kv * hd, d),
              p + "attn_out.weight": w(d, d), p + "ff_norm.weight": 1 + w(d),
              p + "ff_proj.weight": w(ff, d), p + "up_proj.weight": w(ff, d),
              p + "ff_out.weight": w(d, ff)}
    return t


def write_llada(path: Path, cfg: dict = LLADA_CONFIG, shards: int = 1, seed: int = 0) -> dict:
    """A LLaDA-layout folder; with ``shards > 1`` an index and sharded files."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = random_llada_tensors(cfg, seed)
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "tokenizer.json").write_text(TOKENIZER.read_text())
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"))
        return tensors
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(path / fname))
        weight_map |= {n: fname for n in part}
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return tensors


def write_dream(path: Path, cfg: dict = DREAM_CONFIG, seed: int = 0) -> dict:
    """A Dream (Qwen2 names, q/k/v biases) folder with the same math as LLaDA's."""
    rng = np.random.default_rng(seed)
    llada_like = {"d_model": cfg["hidden_size"], "n_heads": cfg["num_attention_heads"],
                  "n_kv_heads": cfg["num_key_value_heads"], "n_layers": cfg["num_hidden_layers"],
                  "mlp_hidden_size": cfg["intermediate_size"], "embedding_size": cfg["vocab_size"]}
    t = random_llada_tensors(llada_like, seed)
    names = {"model.transformer.wte.weight": "model.embed_tokens.weight",
             "model.transformer.ln_f.weight": "model.norm.weight",
             "model.transformer.ff_out.weight": "lm_head.weight"}
    parts = {"attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm",
             "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
             "v_proj": "self_attn.v_proj", "attn_out": "self_attn.o_proj",
             "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "ff_out": "mlp.down_proj"}
    out = {}
    for name, value in t.items():
        if name in names:
            out[names[name]] = value
            continue
        _, _, _, i, part, _ = name.split(".")
        out[f"model.layers.{i}.{parts[part]}.weight"] = value
    for i in range(llada_like["n_layers"]):
        for proj, size in (("q_proj", llada_like["d_model"]),
                           ("k_proj", out[f"model.layers.{i}.self_attn.k_proj.weight"].shape[0]),
                           ("v_proj", out[f"model.layers.{i}.self_attn.v_proj.weight"].shape[0])):
            out[f"model.layers.{i}.self_attn.{proj}.bias"] = (
                rng.standard_normal(size) * 0.2).astype(np.float32)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "tokenizer.json").write_text(TOKENIZER.read_text())
    save_file(out, str(path / "model.safetensors"))
    return out


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x: np.ndarray, theta: float) -> np.ndarray:
    """x: (heads, T, hd); rotate pairs (j, j + hd/2) by position * theta^(-2j/hd)."""
    _, T, hd = x.shape
    half = hd // 2
    freqs = theta ** (-np.arange(half) * 2.0 / hd)
    ang = np.arange(T)[:, None] * freqs[None, :]  # (T, half)
    cos, sin = np.cos(ang), np.sin(ang)
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def reference_logits(tensors: dict, ids: list[int], *, d: int, n_heads: int, n_kv: int,
                     n_layers: int, theta: float, eps: float, dream: bool = False) -> np.ndarray:
    """Logits (T, V) of one unpadded sequence, bidirectional attention, float64."""
    g = {k: v.astype(np.float64) for k, v in tensors.items()}
    if dream:
        emb, head, lnf = g["model.embed_tokens.weight"], g["lm_head.weight"], g["model.norm.weight"]
    else:
        emb = g["model.transformer.wte.weight"]
        head, lnf = g["model.transformer.ff_out.weight"], g["model.transformer.ln_f.weight"]
    x = emb[ids]  # (T, d)
    T, hd = len(ids), d // n_heads
    for i in range(n_layers):
        if dream:
            p = f"model.layers.{i}."
            names = {k: p + v for k, v in {
                "attn_norm": "input_layernorm", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
                "v": "self_attn.v_proj", "o": "self_attn.o_proj", "ff_norm":
                "post_attention_layernorm", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                "down": "mlp.down_proj"}.items()}
        else:
            p = f"model.transformer.blocks.{i}."
            names = {k: p + v for k, v in {
                "attn_norm": "attn_norm", "q": "q_proj", "k": "k_proj", "v": "v_proj",
                "o": "attn_out", "ff_norm": "ff_norm", "gate": "ff_proj", "up": "up_proj",
                "down": "ff_out"}.items()}
        h = _rms(x, g[names["attn_norm"] + ".weight"], eps)
        qkv = []
        for key in ("q", "k", "v"):
            y = h @ g[names[key] + ".weight"].T
            if names[key] + ".bias" in g:
                y = y + g[names[key] + ".bias"]
            qkv.append(y.reshape(T, -1, hd).transpose(1, 0, 2))  # (heads, T, hd)
        q, k, v = _rope(qkv[0], theta), _rope(qkv[1], theta), qkv[2]
        rep = n_heads // n_kv
        k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
        att = q @ k.transpose(0, 2, 1) / np.sqrt(hd)  # (H, T, T), no causal mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = (att @ v).transpose(1, 0, 2).reshape(T, d)
        x = x + o @ g[names["o"] + ".weight"].T
        h = _rms(x, g[names["ff_norm"] + ".weight"], eps)
        gate = h @ g[names["gate"] + ".weight"].T
        up = h @ g[names["up"] + ".weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ g[names["down"] + ".weight"].T
    logits = _rms(x, lnf, eps) @ head.T
    if dream:  # Dream's output at i - 1 predicts token i
        logits = np.concatenate([logits[:1], logits[:-1]], axis=0)
    return logits
