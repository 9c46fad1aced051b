"""A bidirectional Llama-style transformer with LLaDA's module names.

The mask predictor of masked diffusion (LLaDA, Nie et al. 2025; MDLM, Sahoo et
al. 2024) is a plain transformer without a causal mask and without a timestep
input. Module names follow LLaDA's checkpoints (``model.transformer.blocks.{i}.
q_proj`` ...) so its weights load by name. The same network with
``config.causal`` is the autoregressive twin used for parity studies.

Attention works on explicit positions and a key-validity mask, so one code path
serves left-padded batches, the prefix KV cache and the dual (block) cache of
Fast-dLLM (Wu et al. 2025): cached keys are stored after RoPE together with
their positions, and the order of keys does not matter to bidirectional
attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ruvdllm.config import ModelConfig

# Inference on CUDA in 16 bits runs RMSNorm, RoPE and SwiGLU as fused Triton kernels
# (ruvdllm/kernels/elementwise.py); False keeps the eager ops (the bench times both).
FUSED_KERNELS = True
# Blocks use their fused q/k/v and gate/up products once built (Block.fuse_projections);
# False uses the separate projections (the bench's eager naive reference).
FUSED_PROJECTIONS = True
# The fast path's W4A8 split-K products leave their terms to the norm kernel that adds
# them (settle); False adds them with atomics and converts (the probe times both).
SPLIT_K_PARTIALS = True


def fused_kernels(x: Tensor) -> bool:
    """Fused kernels serve 16-bit CUDA tensors outside autograd (they have no backward)."""
    return (FUSED_KERNELS and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and not torch.is_grad_enabled())


@dataclass
class KVCache:
    """Per-layer keys and values of already encoded positions.

    ``keys[i]``/``values[i]`` are ``(B, Hkv, S, hd)`` after RoPE; ``positions``
    and ``valid`` are ``(B, S)``.
    """

    keys: list[Tensor]
    values: list[Tensor]
    positions: Tensor
    valid: Tensor

    @property
    def length(self) -> int:
        return int(self.positions.shape[1])

    def select(self, index: Tensor) -> KVCache:
        """The cache restricted to sequence indices ``index`` (1-D)."""
        return KVCache(
            keys=[k.index_select(2, index) for k in self.keys],
            values=[v.index_select(2, index) for v in self.values],
            positions=self.positions.index_select(1, index),
            valid=self.valid.index_select(1, index),
        )


@dataclass
class StaticKV:
    """Fixed per-layer key/value buffers ``(B, Hkv, L, hd)`` for shape-stable decoding.

    Unlike :class:`KVCache` they never grow or shrink: a forward writes the
    keys/values of the slots it encodes in place (:meth:`DiffusionLM.forward_into`).
    """

    keys: list[Tensor]
    values: list[Tensor]

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, length: int, dtype: torch.dtype,
              device: torch.device) -> StaticKV:
        shape = (batch, cfg.n_kv_heads, length, cfg.head_dim)  # (B, Hkv, L, hd)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)])


@dataclass
class ModelOutput:
    logits: Tensor  # (B, T', V) — T' positions of logits_slice
    hidden: Tensor | None = None  # (B, T, d) final normalised hidden states
    cache: KVCache | None = None  # cache of this call's positions (with the past)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if fused_kernels(x) and self.weight.dtype == x.dtype:
            from ruvdllm.kernels.elementwise import rms_norm  # Triton: CUDA only

            return rms_norm(x, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables ``(B, 1, T, hd)`` for integer positions ``(B, T)`` (Su et al. 2021)."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    )
    angles = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, T, hd)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``(B, H, T, hd)``: halves layout, as LLaDA/Llama."""
    if fused_kernels(x):
        from ruvdllm.kernels.elementwise import rope  # Triton: CUDA only

        return rope(x, cos, sin)
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up``, the gated MLP activation of Llama/LLaDA (Shazeer 2020)."""
    if fused_kernels(up) and gate.dtype == up.dtype:
        from ruvdllm.kernels.elementwise import swiglu as fused

        return fused(gate, up)
    return F.silu(gate) * up


def settle(term: Tensor, like: Tensor) -> Tensor:
    """A residual term in ``like``'s shape: split-K partials ``(S, *like.shape)`` (a W4A8
    product's, :meth:`ruvdllm.quant.W4A8Linear.forward_rows`) summed in float32 and
    rounded to ``like``'s dtype, as the fused norm kernel sums them; other terms as they are."""
    return term.float().sum(0).to(like.dtype) if term.dim() == like.dim() + 1 else term


class FusedProjection:
    """One linear computing several projections of a block side by side.

    At a cached denoising step each projection is a small product (32-64 rows)
    bound by its weight bytes and its launch; q/k/v (and gate/up) read the same
    input, so one product over their concatenated weights moves the same bytes
    in fewer, larger launches with more column tiles in flight. The parts keep
    their modules and names (checkpoints load and save unchanged); their weights
    become row slices (views) of the fused weight, so nothing is stored twice.
    Not a submodule: it is never saved, and it is used only while every part
    is still the module it was built from, holding the same storage.
    """

    def __init__(self, parts: list[nn.Module]) -> None:
        from ruvdllm.quant import Int4Linear, QuantizedLinear  # quant imports this module

        first = parts[0]
        self.parts = parts
        self.sizes = [cast(int, p.out_features) for p in parts]
        bias = None
        if first.bias is not None:
            bias = nn.Parameter(torch.cat([cast(Tensor, p.bias).detach() for p in parts]),
                                requires_grad=False)
        bounds = [0, *torch.tensor(self.sizes).cumsum(0).tolist()]
        self.linear: nn.Module
        if isinstance(first, QuantizedLinear):
            weight, scales = first.concatenate(cast(list[QuantizedLinear], parts))
            fused = type(first)(first.in_features, weight.shape[0], weight, scales, bias)
            self.linear = fused
            for p, lo, hi in zip(parts, bounds, bounds[1:], strict=False):
                p.weight, p.scales = weight[lo:hi], fused.rows_scales(lo, hi)
                if isinstance(p, Int4Linear):
                    p._kernel = None  # its derived CPU-kernel copy is of the old storage
        else:
            weight = torch.cat([cast(Tensor, p.weight).detach() for p in parts])  # (sum N, in)
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
            linear.weight = nn.Parameter(weight, requires_grad=False)
            linear.bias = bias
            self.linear = linear
            for p, lo, hi in zip(parts, bounds, bounds[1:], strict=False):
                p.weight = nn.Parameter(weight[lo:hi], requires_grad=False)
        self._ptrs = [cast(Tensor, p.weight).data_ptr() for p in parts]

    @staticmethod
    def fusable(parts: list[nn.Module]) -> bool:
        """Plain or quantized linears of one type, input, dtype and bias presence."""
        from ruvdllm.quant import Fp8Linear, Int4Linear, Int8Linear, W4A8Linear

        kind = type(parts[0])
        return (kind in (nn.Linear, Int4Linear, Int8Linear, Fp8Linear, W4A8Linear)
                and all(type(p) is kind for p in parts)
                and len({(p.in_features, cast(Tensor, p.weight).dtype, p.bias is None)
                         for p in parts}) == 1)

    def valid(self, parts: list[nn.Module]) -> bool:
        """Whether ``parts`` are still the fused modules, holding the fused storage."""
        return all(p is q and cast(Tensor, p.weight).data_ptr() == ptr
                   for p, q, ptr in zip(parts, self.parts, self._ptrs, strict=True))


class Block(nn.Module):
    """Pre-norm attention + SwiGLU MLP; names match LLaDA's LLaDALlamaBlock."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        kv_dim = cfg.n_kv_heads * cfg.head_dim
        bias = cfg.include_qkv_bias
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=bias)
        self.attn_out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.ff_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden_size, bias=False)  # gate
        self.up_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.residual_dropout)
        self._fused: dict[str, FusedProjection] = {}

    def fuse_projections(self) -> None:
        """Build (or rebuild, if the parts changed) the fused q/k/v and gate/up products."""
        for key, names in _FUSED_GROUPS.items():
            parts = [getattr(self, n) for n in names]
            if self._fused_for(key) is None and FusedProjection.fusable(parts):
                self._fused[key] = FusedProjection(parts)

    def _fused_for(self, key: str) -> FusedProjection | None:
        """The fused product ``key`` if it still stands for this block's modules."""
        fused = self._fused.get(key) if FUSED_PROJECTIONS else None
        if fused is None or not fused.valid([getattr(self, n) for n in _FUSED_GROUPS[key]]):
            return None
        return fused

    def _qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries ``(B, H, T, hd)`` and keys/values ``(B, Hkv, T, hd)``, RoPE applied."""
        B, T, _ = x.shape
        hd, H, Hkv = self.cfg.head_dim, self.cfg.n_heads, self.cfg.n_kv_heads
        fused = self._fused_for("qkv")
        if fused is not None:
            qkv = self._norm_then(self.attn_norm, x, fused.linear)[1]
            q, k, v = qkv.split(fused.sizes, dim=-1)  # (B, T, d), 2 x (B, T, kv)
        else:
            h = self.attn_norm(x)
            q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        q = q.view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, Hkv, hd).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, Hkv, hd).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _attend_and_mlp(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor,
                        attn_mask: Tensor | None, partials: bool = False) -> tuple[Tensor, Tensor]:
        """Attention of ``q`` over ``k``/``v``, output projection, then the SwiGLU MLP.

        Returns ``(s, u)``, the block's output being ``s + u``: the fast path
        leaves the last sum to the next block's norm kernel. With ``partials``
        (inference; the caller passes ``u`` to a norm kernel or to :func:`settle`) the
        W4A8 output and MLP products leave a split K's terms to the norm kernels.
        """
        from ruvdllm.quant import Fp8Linear, W4A8Linear  # quant imports this module

        B, T, _ = x.shape
        H, Hkv = self.cfg.n_heads, self.cfg.n_kv_heads
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=Hkv != H)
        att = att.transpose(1, 2).reshape(B, T, H * self.cfg.head_dim)  # (B, T, d)
        fused = self._fused_for("gate_up")
        if partials and fused is not None and isinstance(self.attn_out, W4A8Linear):
            update = self.attn_out(att, partials=True)  # (S, B, T, d): ff_norm's kernel sums
        else:
            update = self.dropout(self.attn_out(att))
        if fused is None:
            x = x + update
            h = self.ff_norm(x)
            return x, self.dropout(self.ff_out(swiglu(self.ff_proj(h), self.up_proj(h))))
        x, gate_up = self._norm_then(self.ff_norm, x, fused.linear, update)  # (B, T, 2F)
        if not fused_kernels(gate_up):
            return x, self.dropout(self.ff_out(swiglu(*gate_up.split(fused.sizes, dim=-1))))
        from ruvdllm.kernels.elementwise import (
            swiglu_halves,
            swiglu_halves_amax,
            swiglu_halves_rows,
        )

        out = self.ff_out
        fp8_rows = isinstance(out, Fp8Linear) and out.takes_rows(gate_up)
        if isinstance(out, Fp8Linear) and not fp8_rows:  # chunk maxima: no input reduction
            act, amax = swiglu_halves_amax(gate_up)  # (B, T, F)
            return x, self.dropout(out(act, amax=amax))
        if isinstance(out, (Fp8Linear, W4A8Linear)):  # quantized by the SwiGLU kernel itself
            q, scale = swiglu_halves_rows(gate_up, fp8=fp8_rows)  # (B T, F)
            if partials and isinstance(out, W4A8Linear):
                return x, out.forward_rows(q, scale, (B, T), x.dtype, partials=True)
            return x, self.dropout(out.forward_rows(q, scale, (B, T), x.dtype))
        return x, self.dropout(out(swiglu_halves(gate_up)))

    def _norm_then(self, norm: RMSNorm, x: Tensor, linear: nn.Module,
                   residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(s, linear(norm(s)))`` with ``s = x + residual`` (``x`` without one).

        Fused (16-bit CUDA): one kernel for the sum and the norm, which also
        hands a float8 linear its input's row maxima (for one scale per tensor) or,
        from :data:`ruvdllm.quant.FP8_ROWS` rows, its input quantized per row, and a
        W4A8 linear its input quantized per row.
        """
        from ruvdllm.quant import Fp8Linear, W4A8Linear  # quant imports this module

        if fused_kernels(x) and norm.weight.dtype == x.dtype:
            from ruvdllm.kernels.elementwise import add_rms_norm, add_rms_norm_rows

            if isinstance(linear, W4A8Linear) or (isinstance(linear, Fp8Linear)
                                                  and linear.takes_rows(x)):
                x, q, scale = add_rms_norm_rows(x, residual, norm.weight, norm.eps,
                                                fp8=isinstance(linear, Fp8Linear))
                return x, linear.forward_rows(q, scale, x.shape[:-1], x.dtype)
            fp8 = isinstance(linear, Fp8Linear)
            x, h, amax = add_rms_norm(x, residual, norm.weight, norm.eps, amax=fp8)
            return x, cast(Tensor, linear(h, amax=amax) if fp8 else linear(h))
        if residual is not None:
            x = x + settle(residual, x)
        return x, cast(Tensor, linear(norm(x)))

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        attn_mask: Tensor,
        past: tuple[Tensor, Tensor] | None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        q, k, v = self._qkv(x, cos, sin)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, Hkv, S+T, hd)
            v = torch.cat([past[1], v], dim=2)
        x, update = self._attend_and_mlp(x, q, k, v, attn_mask)
        return x + update, (k, v)

    def forward_into(self, x: Tensor, cos: Tensor, sin: Tensor, attn_mask: Tensor | None,
                     keys: Tensor, values: Tensor, index: Tensor,
                     pending: Tensor | None, length: int | None = None) -> tuple[Tensor, Tensor]:
        """Encode ``x + pending`` ``(B, T, d)`` at sequence slots ``index`` ``(T,)`` of a
        fixed buffer; ``(s, u)`` as :meth:`_attend_and_mlp` (the output is ``s + u``).

        ``pending`` is the previous block's ``u`` (split-K terms too, :func:`settle`),
        added by this block's first norm kernel. The new keys/values are written into
        ``keys``/``values`` ``(B, Hkv, L, hd)`` at ``index`` (replacing what those slots
        held), then the queries attend to all ``L`` slots, or to the first ``length``
        (``attn_mask`` already cut to them). Shapes never change, so the call can be
        captured in a CUDA graph; bidirectional attention does not care about slot order.
        """
        fused = self._fused_for("qkv")
        if fused is not None and fused_kernels(x):  # one kernel: RoPE and the two slot writes
            from ruvdllm.kernels.elementwise import rope_qkv_into  # Triton: CUDA only

            x, qkv = self._norm_then(self.attn_norm, x, fused.linear, pending)
            q = rope_qkv_into(qkv, cos, sin, keys, values, index, self.cfg.n_heads)
        else:
            x = x if pending is None else x + settle(pending, x)
            q, k, v = self._qkv(x, cos, sin)
            keys.index_copy_(2, index, k)
            values.index_copy_(2, index, v)
        if length is not None:
            keys, values = keys[:, :, :length], values[:, :, :length]  # (B, Hkv, length, hd)
        # in eval the norm kernels sum split-K terms (dropout would treat each apart)
        return self._attend_and_mlp(x, q, keys, values, attn_mask,
                                    partials=SPLIT_K_PARTIALS and fused_kernels(x)
                                    and not self.training)


# Projections of a block that read the same input: fused by Block.fuse_projections.
_FUSED_GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("ff_proj", "up_proj")}


class Transformer(nn.Module):
    """Holds LLaDA's ``transformer`` submodules: wte, blocks, ln_f, ff_out."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # Under torch.device("meta") (a checkpoint load) nn.Embedding gets an uninitialized
        # weight and skips its N(0, 1) init: meta normal_ imports torch._dynamo (about 2 s and
        # 130 MB per process). Elsewhere that init runs, though reset_parameters overwrites
        # it, so a seeded model draws the same random weights as before.
        on_meta = torch.empty(0).is_meta
        self.wte = nn.Embedding(cfg.embedding_size, cfg.d_model, _weight=torch.empty(
            cfg.embedding_size, cfg.d_model) if on_meta else None)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        if not cfg.weight_tying:
            self.ff_out = nn.Linear(cfg.d_model, cfg.embedding_size, bias=False)


class Inner(nn.Module):
    """The ``model.`` level of LLaDA's names (``model.transformer...``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.transformer = Transformer(cfg)


class DiffusionLM(nn.Module):
    """Mask predictor ``p(x_0 | x_t)``; with ``cfg.causal`` an AR language model."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Inner(cfg)
        self.reset_parameters()

    @property
    def transformer(self) -> Transformer:
        return self.model.transformer

    def reset_parameters(self, std: float = 0.02) -> None:
        """GPT-2 style init: N(0, 0.02), residual projections scaled by 1/sqrt(2L).

        Parameters on the meta device (a checkpoint load builds the model there) hold no
        values and are skipped: torch's meta ``normal_`` imports ``torch._dynamo``, which
        cost every process that loads a model about 2 s and 130 MB of resident memory.
        """
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if name.endswith(("norm.weight", "ln_f.weight")):
                nn.init.ones_(p)
            elif p.dim() == 1:  # qkv biases (Dream layout)
                nn.init.zeros_(p)
            elif name.endswith("attn_out.weight") or (
                ".blocks." in name and name.endswith("ff_out.weight")
            ):
                nn.init.normal_(p, std=std / (2 * self.config.n_layers) ** 0.5)
            else:
                nn.init.normal_(p, std=std)

    def fuse_projections(self) -> None:
        """One q/k/v and one gate/up product per block (:class:`FusedProjection`).

        For inference: the fast path calls it on CUDA. Parameters keep their
        names and shapes but become views of the fused weights, so a state dict
        taken afterwards shares storage between them (``save_checkpoint`` copies
        to CPU first, which separates them on a CUDA model); the parts' parameters
        are frozen (``requires_grad=False``).
        """
        for block in cast(list[Block], list(self.transformer.blocks)):
            block.fuse_projections()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        input_ids: Tensor,
        *,
        positions: Tensor | None = None,
        valid: Tensor | None = None,
        cache: KVCache | None = None,
        return_cache: bool = False,
        return_hidden: bool = False,
        logits_slice: slice | None = None,
    ) -> ModelOutput:
        """Encode ``input_ids`` ``(B, T)``, attending also to ``cache`` if given.

        ``valid`` ``(B, T)`` marks real tokens (False for left padding);
        ``positions`` defaults to ``cumsum(valid) - 1`` continuing after the
        cache. Logits are computed only for ``logits_slice`` of this call's
        positions (all by default): the LM head is the largest matmul of a
        small-step decode, and a sampler needs it for the current block only.
        """
        cfg = self.config
        B, T = input_ids.shape
        dev = input_ids.device
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=dev)
        if positions is None:
            start = cache.positions.max(dim=1, keepdim=True).values + 1 if cache else 0
            positions = (valid.long().cumsum(1) - 1).clamp(min=0) + start
        key_pos, key_valid = positions, valid
        if cache is not None:
            key_pos = torch.cat([cache.positions, positions], dim=1)  # (B, S+T)
            key_valid = torch.cat([cache.valid, valid], dim=1)
        mask = key_valid[:, None, None, :]  # (B, 1, 1, S+T)
        if cfg.causal:
            mask = mask & (key_pos[:, None, None, :] <= positions[:, None, :, None])
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)

        tr = self.transformer
        x = tr.wte(input_ids)
        keys: list[Tensor] = []
        values: list[Tensor] = []
        for i, block in enumerate(tr.blocks):
            past = (cache.keys[i], cache.values[i]) if cache is not None else None
            x, (k, v) = block(x, cos, sin, mask, past)
            if return_cache:
                keys.append(k)
                values.append(v)
        hidden = tr.ln_f(x)
        h = hidden if logits_slice is None else hidden[:, logits_slice]
        if cfg.logits_shift:  # Dream: the output at i - 1 predicts token i
            idx = torch.arange(T, device=dev)[logits_slice or slice(None)]
            h = hidden[:, (idx - 1).clamp(min=0)]
        logits = h @ tr.wte.weight.t() if cfg.weight_tying else tr.ff_out(h)
        new_cache = None
        if return_cache:
            new_cache = KVCache(keys, values, key_pos, key_valid)
        return ModelOutput(logits=logits, hidden=hidden if return_hidden else None,
                           cache=new_cache)

    def forward_into(self, input_ids: Tensor, positions: Tensor, index: Tensor,
                     buffers: StaticKV, attn_mask: Tensor | None, logits_rows: Tensor,
                     length: int | None = None) -> Tensor:
        """Logits ``(B, R, V)`` of rows ``logits_rows`` ``(R,)`` of ``input_ids`` ``(B, T)``.

        The shape-stable forward of the GPU fast path (:mod:`ruvdllm.fast_sampler`):
        the tokens sit at slots ``index`` ``(T,)`` of the sequence held by
        ``buffers``; their keys/values overwrite those slots and every query
        attends to all slots (or the first ``length``: a suffix window) where
        ``attn_mask`` ``(B, 1, 1, L)`` (None: all) is True. A whole-sequence forward
        (``index`` = all slots) equals :meth:`forward`; a block forward over fresh
        buffers is Fast-dLLM's dual cache. Index tensors, not Python slices, select
        rows, so one captured graph serves every block.
        """
        cfg = self.config
        if cfg.causal:
            raise ValueError("forward_into serves bidirectional (diffusion) models only")
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        tr = self.transformer
        x = tr.wte(input_ids)
        blocks = cast(list[Block], list(tr.blocks))
        if attn_mask is not None and length is not None:
            attn_mask = attn_mask[..., :length]  # (B, 1, 1, length)
        pending: Tensor | None = None  # each block's last residual sum, left to the next
        for block, keys, values in zip(blocks, buffers.keys, buffers.values, strict=True):
            x, pending = block.forward_into(x, cos, sin, attn_mask, keys, values, index,
                                            pending, length)
        if cfg.logits_shift:  # Dream: the output at i - 1 predicts token i
            logits_rows = (logits_rows - 1).clamp(min=0)
        x = x.index_select(1, logits_rows)  # (B, R, d): the last sum for these rows only
        if pending is not None:  # (B, T, d), or split-K terms (S, B, T, d)
            x = x + settle(pending.index_select(-2, logits_rows), x)
        h = tr.ln_f(x)
        logits = h @ tr.wte.weight.t() if cfg.weight_tying else tr.ff_out(h)
        return logits
