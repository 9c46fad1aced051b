"""Local learning: train one TALoRA bank's LoRA on the node's own text.

Each bank learns the denoising work of its own timesteps: the masked-diffusion
loss of :func:`ruvdllm.train.diffusion_loss` (LLaDA, Nie et al. 2025) with
``t ~ U(bank range)``, through LoRA (Hu et al. 2021) on the frozen base. It
starts from the bank's current global adapter, so a local pattern is "global
plus what this node's text adds", and with a federation seed it follows
FFA-LoRA (Sun et al. 2024): ``A`` is the seeded frozen matrix and only ``B``
trains, which makes the node's update ``trained_B - global_B`` exactly
averageable.

Training runs on :func:`ruvdllm.lora.base_view` of the model, a twin that
shares the weights but not the modules, so the caller's model (which may be
serving requests with its own adapter mix) is never touched. Making a twin
deep-copies the module tree (20 ms for the int8 default model, against
0.6 ms to find a kept one), so twins are kept
per model and made again only when the model's tensors change (another
tensor or another storage, e.g. after quantizing or moving it): one for
embeddings (eval mode, shared by concurrent calls) and one for training (LoRA
attached for the call and detached after, used by one call at a time).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

from ruvdllm.lora import Adapter, LoRAConfig, LoRAModel, base_view, check_adapter, frozen_a, zero_b
from ruvdllm.model import DiffusionLM
from ruvdllm.talora import BANK_RANGES, DEFAULT_LORA
from ruvdllm.tokenizer import Tokenizer
from ruvdllm.train import batch_windows, diffusion_loss, token_stream

MIN_T = 0.02  # lower end of t for the fine bank: 1/t weights explode near 0
EVAL_BATCHES = 2  # default number of fixed batches scored before and after training


class _View:
    """A cached :func:`base_view` twin and the parameter signature it was made for."""

    def __init__(self, model: DiffusionLM, signature: tuple[tuple[int, int], ...]) -> None:
        self.signature = signature
        self.twin = base_view(model)
        self.busy = threading.Lock()  # held while a training call has LoRA attached to it


_VIEWS: weakref.WeakKeyDictionary[DiffusionLM, dict[str, _View]] = weakref.WeakKeyDictionary()
_VIEWS_LOCK = threading.Lock()


def _cached_view(model: DiffusionLM, kind: str) -> _View:
    """The ``kind`` twin of ``model``, made again if its parameters are no longer the twin's.

    The signature is (object id, storage address) of every parameter and buffer (quantized
    weights are buffers): LoRA wrappers add none, so attaching adapters to ``model`` keeps
    the twin, while quantizing (new modules) or moving it to another device (new storage)
    makes a new one.
    """
    signature = tuple((id(t), t.data_ptr()) for t in (*model.parameters(), *model.buffers()))
    with _VIEWS_LOCK:
        views = _VIEWS.setdefault(model, {})
        view = views.get(kind)
        if view is None or view.signature != signature:
            view = views[kind] = _View(model, signature)
        return view


@contextmanager
def _training_twin(model: DiffusionLM) -> Iterator[DiffusionLM]:
    """The cached training twin of ``model``, or a fresh one while another call trains on it."""
    view = _cached_view(model, "train")
    if not view.busy.acquire(blocking=False):
        yield base_view(model)
        return
    try:
        yield view.twin
    finally:
        view.busy.release()


@torch.no_grad()
def prompt_embedding(model: DiffusionLM, tokenizer: Tokenizer, texts: list[str],
                     max_tokens: int = 4096, seq_len: int = 256) -> np.ndarray:
    """Mean-pooled final hidden state of ``texts`` under the base model, ``(d_model,)``.

    This is a TALoRA key: the embedding of a prompt at generation time, of a
    training folder when a pattern is stored. Long inputs are cut into windows
    of ``seq_len`` and at most ``max_tokens`` tokens are read (evenly spaced
    windows), so keying a large folder stays cheap.
    """
    if not texts or not any(t.strip() for t in texts):
        raise ValueError("no text to embed")
    stream = token_stream(texts, tokenizer).long()
    n = max(1, min(len(stream) // seq_len, max_tokens // seq_len))
    if len(stream) <= seq_len:
        batch = stream[None]  # (1, T)
    else:
        starts = torch.linspace(0, len(stream) - seq_len, n).long()
        batch = stream[starts[:, None] + torch.arange(seq_len)]  # (n, seq_len)
    twin = _cached_view(model, "embed").twin.eval()
    dev = next(twin.parameters()).device
    out = twin(batch.to(dev), return_hidden=True, logits_slice=slice(0, 0))
    assert out.hidden is not None  # return_hidden=True
    return out.hidden.float().mean(dim=(0, 1)).cpu().numpy()


def _initial(model: DiffusionLM, lora: LoRAConfig, init: Adapter | None,
             ffa_seed: int | None, seed: int) -> tuple[Adapter, list[str]]:
    """Starting A and B, and which keys train (B only under FFA-LoRA)."""
    if init is not None:
        check_adapter(model, lora, init, pairs=False)
    init = init or {}
    if ffa_seed is not None:
        a = frozen_a(model, lora, ffa_seed)
        for name, value in a.items():
            if name in init and not torch.allclose(init[name].float().cpu(), value):
                raise ValueError(f"init {name} differs from the FFA-LoRA A of seed {ffa_seed}: "
                                 "the global adapter was made with another seed")
    else:  # plain LoRA: A from init, else a seeded Kaiming-uniform draw
        a = {name: init[name].float().cpu() if name in init else value
             for name, value in frozen_a(model, lora, seed).items()}
    b0 = zero_b(model, lora)
    start: Adapter = {**a, **{k: init[k].float().cpu() if k in init else v for k, v in b0.items()}}
    trainable = [k for k in start if k.endswith("B") or ffa_seed is None]
    return start, trainable


def train_bank(model: DiffusionLM, tokenizer: Tokenizer, texts: list[str], bank: str, *,
               lora: LoRAConfig = DEFAULT_LORA, init: Adapter | None = None,
               ffa_seed: int | None = None, steps: int = 20, lr: float = 3e-3,
               seq_len: int = 128, batch_size: int = 4, seed: int = 0,
               eval_batches: int = EVAL_BATCHES) -> tuple[Adapter, dict[str, float]]:
    """Train bank ``bank``'s adapter on ``texts``; returns it and metrics.

    Metrics: ``loss_before``/``loss_after`` (the diffusion loss on
    ``eval_batches`` fixed batches of the text, with the same masks and ``t``
    before and after), ``quality_gain = (before - after) / before`` and
    ``examples`` (windows of ``seq_len`` in the text, the weight of this update
    in federated averaging). With ``eval_batches=0`` nothing is scored and the
    three loss figures are left out of the metrics: scoring costs
    ``2 * eval_batches`` forwards, more than a 1-step training itself.
    ``model`` is left exactly as it was.
    """
    if bank not in BANK_RANGES:
        raise ValueError(f"unknown bank {bank!r}; choose from {', '.join(BANK_RANGES)}")
    if steps < 1 or batch_size < 1 or seq_len < 2 or not lr > 0 or eval_batches < 0:
        raise ValueError("steps, batch_size and lr must be positive, seq_len at least 2 and "
                         "eval_batches at least 0")
    stream = token_stream([t for t in texts if t.strip()], tokenizer) if texts else None
    if stream is None or len(stream) <= seq_len:
        raise ValueError(f"need more than {seq_len} tokens of text to train, got "
                         f"{0 if stream is None else len(stream)}")
    start, trainable = _initial(model, lora, init, ffa_seed, seed)
    with _training_twin(model) as twin:
        lm = LoRAModel(twin.train(), lora)
        try:
            return _train(lm, stream, bank, start, trainable, steps=steps, lr=lr,
                          seq_len=seq_len, batch_size=batch_size, seed=seed,
                          eval_batches=eval_batches)
        finally:
            lm.detach()  # leave the cached twin without wrappers for the next call


def _train(lm: LoRAModel, stream: Tensor, bank: str, start: Adapter, trainable: list[str], *,
           steps: int, lr: float, seq_len: int, batch_size: int, seed: int,
           eval_batches: int) -> tuple[Adapter, dict[str, float]]:
    """The training loop of :func:`train_bank` on ``lm``, LoRA attached to a twin."""
    twin = lm.model
    dev = next(twin.parameters()).device
    params = {k: v.detach().to(dev, copy=True).requires_grad_(k in trainable)  # never the caller's
              for k, v in start.items()}
    lm.add("train", params)
    lm.set_mix([("train", 1.0)])
    lo, hi = max(BANK_RANGES[bank][0], MIN_T), BANK_RANGES[bank][1]

    def batch(g: torch.Generator) -> tuple[Tensor, Tensor]:
        """Windows and their t: drawn on the CPU generator, so any device gives the same."""
        x0 = batch_windows(stream, batch_size, seq_len, g)  # (batch, seq_len)
        return x0.to(dev), (lo + (hi - lo) * torch.rand(batch_size, generator=g)).to(dev)

    def fixed_loss() -> float:
        g = torch.Generator(device="cpu").manual_seed(seed + 1)
        masks = torch.Generator(device=dev).manual_seed(seed + 1)
        total = 0.0
        with torch.no_grad():
            for _ in range(eval_batches):
                x0, t = batch(g)
                total += float(diffusion_loss(twin, x0, 0.0, 0.0, masks, t=t))
        return total / eval_batches

    before = fixed_loss() if eval_batches else None
    opt = torch.optim.AdamW([params[k] for k in trainable], lr=lr, weight_decay=0.0)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    masks = torch.Generator(device=dev).manual_seed(seed)
    for _ in range(steps):
        x0, t = batch(gen)
        loss = diffusion_loss(twin, x0, 0.0, 0.0, masks, t=t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    trained = {k: v.detach().cpu().clone() for k, v in params.items()}
    metrics = {"examples": float(len(stream) // seq_len)}
    if before is not None:
        after = fixed_loss()
        metrics |= {"loss_before": before, "loss_after": after,
                    "quality_gain": (before - after) / before if before > 0 else 0.0}
    return trained, metrics
