"""LoRA on LLaDA's named linears, several adapters at once, PEFT import/export.

LoRA (Hu et al. 2021) adds a low-rank update to a frozen weight:
``y = W x + (alpha / r) B A x`` with ``A (r, in)`` and ``B (out, r)``. Here any
number of adapters apply together with per-adapter weights and no merge,

    y = W x + (alpha / r) Σ_i w_i B_i A_i x,

because the TALoRA mix changes with the denoising timestep, i.e. at every step
of the sampler. The adapters of a layer are kept concatenated
(``A_cat (n r, in)``, ``B_cat (out, n r)``) and the mix is one weight per rank
row, written in place by :meth:`LoRAModel.set_mix`; a forward then costs two
thin matmuls over the active adapters only. A single fixed adapter can instead
be merged into float weights (:meth:`LoRAModel.merge`) for zero overhead.

FFA-LoRA (Sun et al. 2024) freezes ``A`` at a seeded random init shared by all
federated clients and trains ``B`` only, so averaging the clients' ``B`` is
exactly averaging their updates ``B A``; :func:`frozen_a` derives those ``A``
from a seed identically on every machine.

Adapters are plain dicts ``"model.transformer.blocks.{i}.{target}.lora_A"`` ->
``(r, in)`` and ``".lora_B"`` -> ``(out, r)``; the PEFT layout on disk is
``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ruvdllm.model import DiffusionLM
from ruvdllm.quant import QuantizedLinear

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")
Adapter = dict[str, Tensor]
_KEY = re.compile(r"^model\.transformer\.blocks\.(\d+)\.([a-z_]+)\.lora_([AB])$")
_PEFT_PREFIX = "base_model.model."
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "attn_out")

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha!r}")
        unknown = [t for t in self.targets if t not in ALL_TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"LoRA targets must be distinct names from {ALL_TARGETS}, "
                             f"got {self.targets}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def key(layer: int, target: str, part: str) -> str:
    """Adapter key of ``lora_A``/``lora_B`` (``part`` "A" or "B") of one linear."""
    return f"model.transformer.blocks.{layer}.{target}.lora_{part}"


def parse_key(name: str) -> tuple[int, str, str]:
    """``(layer, target, "A"|"B")`` of an adapter key, or a ValueError."""
    m = _KEY.match(name)
    if m is None or m.group(2) not in ALL_TARGETS:
        raise ValueError(f"adapter key {name!r} is not model.transformer.blocks.<i>.<target>."
                         f"lora_A|lora_B with a target in {ALL_TARGETS}")
    return int(m.group(1)), m.group(2), m.group(3)


def _linear_shape(model: DiffusionLM, target: str) -> tuple[int, int]:
    """``(out, in)`` of a target linear (same in every block)."""
    lin = getattr(model.transformer.blocks[0], target)
    base = lin.base if isinstance(lin, LoRALinear) else lin
    return base.out_features, base.in_features


def check_adapter(model: DiffusionLM, cfg: LoRAConfig, adapter: Adapter,
                  pairs: bool = True) -> None:
    """ValueError unless every tensor of ``adapter`` fits ``model`` under ``cfg``.

    Every ``A`` is ``(rank, in)`` and every ``B`` ``(out, rank)``, finite; with
    ``pairs`` each (layer, target) present needs both. Targets outside
    ``cfg.targets`` and layers beyond the model are refused.
    """
    if not adapter:
        raise ValueError("adapter is empty")
    n_layers = model.config.n_layers
    present: dict[tuple[int, str], set[str]] = {}
    for name, tensor in adapter.items():
        layer, target, part = parse_key(name)
        if target not in cfg.targets or layer >= n_layers:
            raise ValueError(f"adapter key {name!r} does not fit a model with {n_layers} "
                             f"layers and LoRA targets {cfg.targets}")
        out_f, in_f = _linear_shape(model, target)
        want = (cfg.rank, in_f) if part == "A" else (out_f, cfg.rank)
        if tuple(tensor.shape) != want:
            raise ValueError(f"adapter tensor {name!r} has shape {tuple(tensor.shape)}, the "
                             f"model needs {want} (rank {cfg.rank})")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"adapter tensor {name!r} has non-finite values")
        present.setdefault((layer, target), set()).add(part)
    for (layer, target), parts in present.items():
        if pairs and len(parts) < 2:
            raise ValueError(f"adapter has lora_{'B' if 'A' in parts else 'A'} but not both "
                             f"parts for block {layer} {target}")


def frozen_a(model: DiffusionLM, cfg: LoRAConfig, seed: int) -> Adapter:
    """FFA-LoRA's frozen ``A`` matrices, identical on every machine for a seed.

    Drawn on the CPU generator in a fixed (layer, target) order from
    ``U(-1/sqrt(in), 1/sqrt(in))`` (the bound of PEFT's Kaiming-uniform init), so
    nodes and coordinator agree without shipping ``A``.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out: Adapter = {}
    for layer in range(model.config.n_layers):
        for target in cfg.targets:
            _, in_f = _linear_shape(model, target)
            bound = 1.0 / math.sqrt(in_f)
            u = torch.rand(cfg.rank, in_f, generator=gen, dtype=torch.float32)
            out[key(layer, target, "A")] = (2 * u - 1) * bound  # (r, in)
    return out


def zero_b(model: DiffusionLM, cfg: LoRAConfig) -> Adapter:
    """All-zero ``B`` matrices: with them an adapter starts as the identity update."""
    return {key(layer, target, "B"): torch.zeros(_linear_shape(model, target)[0], cfg.rank)
            for layer in range(model.config.n_layers) for target in cfg.targets}


def base_view(model: DiffusionLM) -> DiffusionLM:
    """A twin of ``model`` sharing its weights (frozen), with no LoRA wrappers.

    Module objects are new and every parameter is a new ``requires_grad=False``
    Parameter on the same storage, so training LoRA on the twin neither
    changes the caller's modules (which may be serving with their own mix in
    another thread) nor computes gradients for the base weights. Tensors held
    as plain attributes (caches such as Int4Linear's kernel layout) are shared.
    """
    memo: dict[int, Any] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                memo[id(p)] = nn.Parameter(p.detach(), requires_grad=False)
        for b in module._buffers.values():
            if b is not None:
                memo[id(b)] = b
        for value in vars(module).values():
            for item in value if isinstance(value, tuple) else (value,):
                if isinstance(item, Tensor):
                    memo[id(item)] = item
    twin: DiffusionLM = copy.deepcopy(model, memo)
    for block in twin.transformer.blocks:
        for target in ALL_TARGETS:
            lin = getattr(block, target)
            if isinstance(lin, LoRALinear):
                setattr(block, target, lin.base)
    return twin


class _Mix:
    """The mix shared by every wrapped linear of one LoRAModel.

    ``rows`` are the rank rows of the active adapters in the concatenated
    ``A_cat``; ``scale`` ``(len(rows),)`` is ``w_i * alpha / r`` per row. None
    rows means no adapter is active and the wrapper costs nothing.
    """

    def __init__(self) -> None:
        self.rows: Tensor | None = None
        self.scale: Tensor | None = None
        self.all_active = False


class LoRALinear(nn.Module):
    """``base(x) + ((x A_catᵀ) * scale) B_catᵀ`` over the active adapters.

    ``base`` is an ``nn.Linear`` or a quantized linear of :mod:`ruvdllm.quant`;
    it is never changed except by merge/unmerge (float only).
    """

    def __init__(self, base: nn.Linear | QuantizedLinear, mix: _Mix) -> None:
        super().__init__()
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.mix = mix
        self.parts: list[tuple[Tensor, Tensor]] = []  # (A, B) per loaded adapter, slot order
        self.A_cat: Tensor | None = None  # (n r, in)
        self.B_cat: Tensor | None = None  # (out, n r)

    def pack(self) -> None:
        """Concatenate the loaded adapters (after add/remove, not per step)."""
        if not self.parts:
            self.A_cat = self.B_cat = None
        elif len(self.parts) == 1:  # keep the tensors themselves, so gradients reach them
            self.A_cat, self.B_cat = self.parts[0]
        else:
            self.A_cat = torch.cat([a for a, _ in self.parts], dim=0)
            self.B_cat = torch.cat([b for _, b in self.parts], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        y: Tensor = self.base(x)
        mix = self.mix
        if mix.rows is None or mix.scale is None or self.A_cat is None or self.B_cat is None:
            return y
        a, b = self.A_cat, self.B_cat
        if not mix.all_active:
            a, b = a.index_select(0, mix.rows), b.index_select(1, mix.rows)
        h = (x @ a.to(x.dtype).t()) * mix.scale.to(x.dtype)  # (..., k r)
        return y + h @ b.to(x.dtype).t()


class LoRAModel:
    """LoRA wrappers attached in place to a DiffusionLM's target linears.

    Adapters are added under ids and combined with :meth:`set_mix`; nothing is
    active until a mix is set. :meth:`detach` restores the original modules.
    """

    def __init__(self, model: DiffusionLM, cfg: LoRAConfig) -> None:
        self.model = model
        self.cfg = cfg
        self.ids: list[str] = []
        self.adapters: dict[str, Adapter] = {}
        self._mix = _Mix()
        self.merged: tuple[str, float] | None = None
        self.wrapped: dict[tuple[int, str], LoRALinear] = {}
        for layer, block in enumerate(model.transformer.blocks):
            for target in cfg.targets:
                lin = getattr(block, target)
                if isinstance(lin, LoRALinear):
                    raise ValueError(f"block {layer} {target} already has LoRA attached; "
                                     "detach the other LoRAModel first")
                if not isinstance(lin, nn.Linear | QuantizedLinear):
                    raise ValueError(f"block {layer} {target} is {type(lin).__name__}, not a "
                                     "linear layer")
        for layer, block in enumerate(model.transformer.blocks):
            for target in cfg.targets:
                wrapper = LoRALinear(getattr(block, target), self._mix)
                setattr(block, target, wrapper)
                self.wrapped[(layer, target)] = wrapper

    def detach(self) -> None:
        """Put the original linears back (unmerging first if needed)."""
        if self.merged is not None:
            self.unmerge()
        for (layer, target), wrapper in self.wrapped.items():
            setattr(self.model.transformer.blocks[layer], target, wrapper.base)
        self.wrapped = {}

    def add(self, adapter_id: str, adapter: Adapter) -> None:
        """Load an adapter (shape-checked against the model: ValueError).

        The tensors are used as given (no copy), so an adapter whose tensors
        require grad can be trained through this wrapper.
        """
        if adapter_id in self.adapters:
            raise ValueError(f"adapter {adapter_id!r} is already loaded")
        check_adapter(self.model, self.cfg, adapter)
        dev = next(self.model.parameters()).device
        tensors = {k: v if v.device == dev else v.to(dev) for k, v in adapter.items()}
        for (layer, target), wrapper in self.wrapped.items():
            a = tensors.get(key(layer, target, "A"))
            b = tensors.get(key(layer, target, "B"))
            if a is None or b is None:  # adapter does not cover this linear: zero update
                a = torch.zeros(self.cfg.rank, wrapper.in_features, device=dev)
                b = torch.zeros(wrapper.out_features, self.cfg.rank, device=dev)
            wrapper.parts.append((a, b))
            wrapper.pack()
        self.ids.append(adapter_id)
        self.adapters[adapter_id] = tensors
        self._clear_mix()

    def remove(self, adapter_id: str) -> None:
        """Unload an adapter; the mix is cleared (set it again)."""
        if adapter_id not in self.adapters:
            raise ValueError(f"adapter {adapter_id!r} is not loaded")
        if self.merged is not None and self.merged[0] == adapter_id:
            raise ValueError(f"adapter {adapter_id!r} is merged; unmerge it first")
        slot = self.ids.index(adapter_id)
        for wrapper in self.wrapped.values():
            del wrapper.parts[slot]
            wrapper.pack()
        del self.ids[slot]
        del self.adapters[adapter_id]
        self._clear_mix()

    def _clear_mix(self) -> None:
        self._mix.rows = self._mix.scale = None
        self._mix.all_active = False

    def set_mix(self, mix: list[tuple[str, float]]) -> None:
        """Weights of the loaded adapters for the next forwards; ``[]`` for the base.

        Costs a few tiny tensors, whatever the model size: no weight is
        rebuilt. Zero weights are dropped, so inactive adapters cost nothing.
        """
        r = self.cfg.rank
        rows: list[int] = []
        scale: list[float] = []
        seen: set[str] = set()
        for adapter_id, weight in mix:
            if adapter_id not in self.adapters:
                raise ValueError(f"adapter {adapter_id!r} is not loaded")
            if self.merged is not None and adapter_id == self.merged[0]:
                raise ValueError(f"adapter {adapter_id!r} is merged into the weights already")
            if adapter_id in seen or not math.isfinite(weight):
                raise ValueError(f"mix lists {adapter_id!r} twice or with weight {weight}")
            seen.add(adapter_id)
            if weight != 0.0:
                slot = self.ids.index(adapter_id)
                rows.extend(range(slot * r, (slot + 1) * r))
                scale.extend([weight * self.cfg.scaling] * r)
        if not rows:
            self._clear_mix()
            return
        dev = next(self.model.parameters()).device
        self._mix.rows = torch.tensor(rows, device=dev)
        self._mix.scale = torch.tensor(scale, device=dev)
        self._mix.all_active = rows == list(range(len(self.ids) * r))

    @torch.no_grad()
    def merge(self, adapter_id: str, weight: float = 1.0) -> None:
        """Add ``weight * (alpha/r) B A`` into the float weights; the mix is cleared.

        Quantized layers are refused: re-quantizing would make unmerge inexact.
        """
        if self.merged is not None:
            raise ValueError(f"adapter {self.merged[0]!r} is merged already; unmerge it first")
        if adapter_id not in self.adapters:
            raise ValueError(f"adapter {adapter_id!r} is not loaded")
        if any(not isinstance(w.base, nn.Linear) for w in self.wrapped.values()):
            raise ValueError("merge needs float linears; this model is quantized, so keep the "
                             "adapter unmerged (set_mix)")
        self._add_delta(adapter_id, weight)
        self.merged = (adapter_id, weight)
        self._clear_mix()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged adapter from the weights again."""
        if self.merged is None:
            raise ValueError("no adapter is merged")
        adapter_id, weight = self.merged
        self._add_delta(adapter_id, -weight)
        self.merged = None

    def _add_delta(self, adapter_id: str, weight: float) -> None:
        slot = self.ids.index(adapter_id)
        for wrapper in self.wrapped.values():
            a, b = wrapper.parts[slot]
            w = wrapper.base.weight  # float (out, in): merge() refused quantized bases
            w += (weight * self.cfg.scaling * (b.float() @ a.float())).to(w.dtype)  # (out, in)


# --- PEFT format -------------------------------------------------------------------------


def export_peft(adapter: Adapter, cfg: LoRAConfig, folder: str | Path,
                base_model: str = "ruvdllm/default") -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT layout)."""
    for name in adapter:
        parse_key(name)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model,
              "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": 0.0, "bias": "none",
              "target_modules": list(cfg.targets), "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False, "inference_mode": True}
    tensors = {f"{_PEFT_PREFIX}{name[:-len('.lora_X')]}.lora_{name[-1]}.weight":
               t.detach().float().contiguous().cpu() for name, t in adapter.items()}
    _atomic_write(out / PEFT_WEIGHTS, lambda p: save_file(tensors, str(p)))
    _atomic_write(out / PEFT_CONFIG, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    return out


def import_peft(folder: str | Path) -> tuple[Adapter, LoRAConfig]:
    """Read a PEFT LoRA folder; refuses options this runtime does not implement."""
    path = Path(folder)
    cfg_file, weights = path / PEFT_CONFIG, path / PEFT_WEIGHTS
    if not cfg_file.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{path}: a PEFT adapter needs {PEFT_CONFIG} and {PEFT_WEIGHTS}")
    try:
        raw: Any = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{cfg_file}: not JSON ({err})") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_file}: peft_type must be LORA")
    for option in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if raw.get(option):
            raise ValueError(f"{cfg_file}: {option} is not supported")
    targets = raw.get("target_modules")
    if not isinstance(targets, list) or not set(targets) <= set(ALL_TARGETS):
        raise ValueError(f"{cfg_file}: target_modules must be a list of names from "
                         f"{ALL_TARGETS}, got {targets!r}")
    try:
        cfg = LoRAConfig(rank=int(raw["r"]), alpha=float(raw["lora_alpha"]),
                         targets=tuple(t for t in ALL_TARGETS if t in targets))
    except (KeyError, TypeError) as err:
        raise ValueError(f"{cfg_file}: missing or malformed r / lora_alpha ({err})") from None
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights}: unreadable safetensors ({err})") from None
    adapter: Adapter = {}
    for name, t in tensors.items():
        m = re.match(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$", name)
        if m is None:
            raise ValueError(f"{weights}: unexpected tensor {name!r}")
        adapter[f"{m.group(1)}.lora_{m.group(2)}"] = t.float()
    for name in adapter:
        parse_key(name)
    return adapter, cfg


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write via a temporary file in the same folder, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
