"""Checkpoint directories in the Hugging Face layout LLaDA and Dream publish.

A checkpoint is a folder with ``config.json``, ``tokenizer.json`` and either
``model.safetensors`` or shards listed in ``model.safetensors.index.json``. The
embedded models share one tokenizer, ``ruvdllm/assets/tokenizer.json``
(:func:`tokenizer_file`), instead of a copy each.
Tensor names are LLaDA's (``model.transformer.blocks.{i}.q_proj.weight`` ...);
Dream's Qwen2 names (``model.layers.{i}.self_attn.q_proj.weight`` ...) are
renamed on load. Every mismatch between config and tensors is reported by name
before any weight is used, so a bad checkpoint is refused, never half-loaded.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ruvdllm.config import ConfigError, ModelConfig
from ruvdllm.model import DiffusionLM

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
ASSETS = Path(__file__).parent / "assets"
NAMED = {"default": ASSETS / "default", "default-ar": ASSETS / "default-ar"}

_DREAM_RENAMES = [
    (r"^model\.embed_tokens\.", "model.transformer.wte."),
    (r"^model\.norm\.", "model.transformer.ln_f."),
    (r"^lm_head\.", "model.transformer.ff_out."),
    (r"^model\.layers\.(\d+)\.input_layernorm\.", r"model.transformer.blocks.\1.attn_norm."),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"model.transformer.blocks.\1.ff_norm."),
    (r"^model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.", r"model.transformer.blocks.\1.\2_proj."),
    (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.", r"model.transformer.blocks.\1.attn_out."),
    (r"^model\.layers\.(\d+)\.mlp\.gate_proj\.", r"model.transformer.blocks.\1.ff_proj."),
    (r"^model\.layers\.(\d+)\.mlp\.up_proj\.", r"model.transformer.blocks.\1.up_proj."),
    (r"^model\.layers\.(\d+)\.mlp\.down_proj\.", r"model.transformer.blocks.\1.ff_out."),
]


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message says why."""


def resolve(path_or_name: str | Path) -> Path:
    """A checkpoint folder from a path or an embedded model's name."""
    if str(path_or_name) in NAMED:
        path = NAMED[str(path_or_name)]
        if not (path / "config.json").exists():
            raise CheckpointError(f"embedded model {path_or_name!r} is not installed at {path}")
        return path
    path = Path(path_or_name)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such model folder")
    return path


def tokenizer_file(path: Path) -> Path:
    """The ``tokenizer.json`` of checkpoint folder ``path``: its own, or for an embedded
    model without one the shared ``assets/tokenizer.json`` (one copy, not one per model:
    the package, and the working tree sent to a GPU machine, stay 450 KB smaller)."""
    own = path / "tokenizer.json"
    embedded = {p.resolve() for p in NAMED.values()}
    return own if own.exists() or path.resolve() not in embedded else ASSETS / "tokenizer.json"


def _rename(name: str) -> str:
    for pattern, repl in _DREAM_RENAMES:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (single file or shards), LLaDA-named."""
    files: list[Path]
    if (path / INDEX).exists():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{path / INDEX}: malformed index ({err})") from None
        files = sorted({path / f for f in weight_map.values()})
    elif (path / SINGLE).exists():
        files = [path / SINGLE]
    else:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{f}: shard named in the index is missing")
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{f}: corrupt safetensors file ({err})") from None
    return {_rename(k): v for k, v in tensors.items()}


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Float weights cast to ``dtype``; quantized weights (float8 too) and their scales kept."""
    return {k: v.to(dtype) if v.is_floating_point() and v.dtype.itemsize > 1
            and not k.endswith(".scales") else v for k, v in tensors.items()}


def load_model(
    path_or_name: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> DiffusionLM:
    """Build the model a checkpoint folder describes and load its weights.

    ``dtype`` casts floating-point weights (quantized weights and their scales
    keep their dtypes). Missing, unexpected or misshapen tensors raise CheckpointError.
    """
    path = resolve(path_or_name)
    try:
        cfg = ModelConfig.load(path / "config.json")
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    tensors = read_tensors(path)
    with torch.device("meta"):
        model = DiffusionLM(cfg)
    if cfg.quantization:
        from ruvdllm.quant import prepare_quantized

        prepare_quantized(model, cfg.quantization)
    if cfg.weight_tying:
        tensors.pop("model.transformer.ff_out.weight", None)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: config and tensors disagree: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}")
    for name, ref in expected.items():
        if tuple(tensors[name].shape) != tuple(ref.shape):
            raise CheckpointError(f"{path}: tensor {name} has shape "
                                  f"{tuple(tensors[name].shape)}, config implies "
                                  f"{tuple(ref.shape)}")
    if dtype is not None:
        tensors = _cast(tensors, dtype)
    model.load_state_dict(tensors, assign=True)
    return model.to(device).eval()


def save_checkpoint(
    model: DiffusionLM,
    path: str | Path,
    tokenizer_file: str | Path | None = None,
    max_shard_bytes: int | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model`` as an HF-layout folder, atomically (temp folder + rename).

    With ``max_shard_bytes`` the weights are split into shards with an index. An
    existing ``path`` is replaced only when it holds nothing but checkpoint files:
    anything else there (a user's notes, a real LLaDA folder's modeling code) is the
    user's and refuses the save before a byte is written.
    """
    path = Path(path)
    _check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if dtype is not None:
        state = _cast(state, dtype)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}"
    tmp.mkdir()  # not mkdtemp: its 0700 would hide the model from other users; mkdir honours umask
    try:
        _write_folder(tmp, model.config, state, tokenizer_file, max_shard_bytes)
    except BaseException:  # disk full, Ctrl-C: leave no half-written folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = tmp.with_name(f"{tmp.name}.old")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)
    return path


def _write_folder(tmp: Path, config: ModelConfig, state: dict[str, torch.Tensor],
                  tokenizer_file: str | Path | None, max_shard_bytes: int | None) -> None:
    """Write config, tokenizer and weights into the fresh folder ``tmp`` and fsync them."""
    config.save(tmp / "config.json")
    if tokenizer_file is not None:
        (tmp / "tokenizer.json").write_bytes(Path(tokenizer_file).read_bytes())
    if max_shard_bytes is None:
        save_file(state, str(tmp / SINGLE), metadata={"format": "pt"})
    else:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, t in state.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += nbytes
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (tmp / INDEX).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    file_mode = tmp.stat().st_mode & 0o666  # safetensors writes 0600 whatever the umask
    for f in tmp.iterdir():
        f.chmod(file_mode)
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def _check_replaceable(path: Path) -> None:
    """Refuse a ``path`` that exists and is anything but a folder of checkpoint files."""
    if not path.exists():
        return
    if not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a folder; choose a new checkpoint folder")
    for entry in sorted(path.iterdir()):
        name = entry.name
        if not (entry.is_file() and (name in ("config.json", "tokenizer.json", SINGLE, INDEX)
                                     or _SHARD.fullmatch(name))):
            raise CheckpointError(
                f"{path} holds {name!r}, which is not a checkpoint file; refusing to replace "
                "the folder: choose a new one or empty it")

