"""``ruvdllm.load(path_or_name) -> Runtime``: a model, its tokenizer and the sampler.

The Runtime turns text in into text out; everything below it works on token
ids. Options of :meth:`Runtime.generate` are :class:`~ruvdllm.sampler.SamplerConfig`
fields. On CUDA, :meth:`Runtime.generate` runs the fast path
(:class:`~ruvdllm.fast_sampler.FastSampler`) whenever the options allow it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, overload

import torch

from ruvdllm.ar import ar_generate, ar_stream
from ruvdllm.checkpoint import load_model, resolve, tokenizer_file
from ruvdllm.fast_sampler import FastSampler
from ruvdllm.model import DiffusionLM
from ruvdllm.quant import DEFAULT_GROUP_SIZE
from ruvdllm.sampler import AnswerTracker, Sampler, SamplerConfig, SamplerError, SamplerHook
from ruvdllm.tokenizer import Tokenizer

_SAMPLER_OPTIONS = {f.name for f in fields(SamplerConfig)}


class Runtime:
    """Generate text with a masked-diffusion model (or, left to right, its causal AR twin).

    A causal model decodes one token per forward (:mod:`ruvdllm.ar`); of the options, only
    ``gen_length``, ``temperature``, ``seed`` and ``repetition_penalty`` apply to it.

    :meth:`generate` runs the fast path when ``fast`` is True (options it lacks are
    refused), or, when ``fast`` is None, on a CUDA device whenever the options allow it:
    greedy, low-confidence remasking, no repetition penalty, no hooks
    (:meth:`sampler_for`). Otherwise, and always for :meth:`stream` (the fast path
    reports no per-step events), the reference :class:`Sampler` runs.
    """

    def __init__(self, model: DiffusionLM, tokenizer: Tokenizer,
                 hooks: list[SamplerHook] | None = None, fast: bool | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.sampler = Sampler(model, hooks)
        self.fast = fast
        # Asked for: built now (a model it cannot run is refused here); by default at first use.
        self._fast_sampler = FastSampler(model) if fast else None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode_prompt(self, prompt: str, chat: bool = False) -> list[int]:
        """Prompt ids: BOS (when the tokenizer has one) then the text or chat turn."""
        tok = self.tokenizer
        if chat:
            prompt = tok.apply_chat_template([{"role": "user", "content": prompt}])
        return tok.encode(prompt, add_bos=tok.bos_token_id is not None)

    def sampler_config(self, **options: Any) -> SamplerConfig:
        unknown = set(options) - _SAMPLER_OPTIONS
        if unknown:
            raise SamplerError(f"unknown generation options {sorted(unknown)}")
        return SamplerConfig(**options)

    def sampler_for(self, cfg: SamplerConfig) -> Sampler | FastSampler:
        """The sampler :meth:`generate` runs ``cfg`` with."""
        auto = self.device.type == "cuda" and not self.model.config.causal
        if not (auto if self.fast is None else self.fast):
            return self.sampler
        refusal = FastSampler.refusal(cfg)
        if refusal is None and self.sampler.hooks:
            refusal = "sampler hooks run in the reference sampler only"
        if refusal is not None:
            if self.fast:
                raise SamplerError(refusal)
            return self.sampler
        if self._fast_sampler is None:
            self._fast_sampler = FastSampler(self.model)
        return self._fast_sampler

    @overload
    def generate(self, prompt: str, *, chat: bool = ..., **options: Any) -> str: ...

    @overload
    def generate(self, prompt: Sequence[str], *, chat: bool = ...,
                 **options: Any) -> list[str]: ...

    def generate(self, prompt: str | Sequence[str], *, chat: bool = False,
                 **options: Any) -> str | list[str]:
        """Completion of one prompt (str) or of each prompt in a batch (list)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        ids = [self.encode_prompt(p, chat) for p in prompts]
        answers = self.generate_ids(ids, self.sampler_config(**options))
        texts = [self.tokenizer.decode(a) for a in answers]
        return texts[0] if isinstance(prompt, str) else texts

    def generate_ids(self, ids: list[list[int]], cfg: SamplerConfig) -> list[list[int]]:
        """Answer tokens per token prompt, cut at the first EOS."""
        if self.model.config.causal:
            return ar_generate(self.model, ids, cfg.gen_length, **_ar_options(cfg))
        return self.sampler_for(cfg).generate(ids, cfg)

    def stream(self, prompt: str, *, chat: bool = False, **options: Any) -> Iterator[str]:
        """Text pieces as the committed prefix of the answer grows.

        A piece is emitted when the committed run at the start of the answer
        extends (:class:`~ruvdllm.sampler.AnswerTracker`), the rest at the end.
        """
        cfg = self.sampler_config(**options)
        ids = [self.encode_prompt(prompt, chat)]
        sent = ""
        for answer in self._prefixes(ids, cfg):
            text = self.tokenizer.decode(answer)
            if text.startswith(sent) and len(text) > len(sent):
                yield text[len(sent):]
                sent = text

    def _prefixes(self, ids: list[list[int]], cfg: SamplerConfig) -> Iterator[list[int]]:
        """The answer's settled start after every step, then the whole answer."""
        mcfg = self.model.config
        if mcfg.causal:
            answer: list[int] = []
            for tok in ar_stream(self.model, ids, cfg.gen_length, **_ar_options(cfg)):
                if int(tok[0]) == mcfg.eos_token_id:
                    break
                answer.append(int(tok[0]))
                yield answer
            return
        tracker = AnswerTracker(len(ids[0]), cfg.gen_length, mcfg.mask_token_id,
                                mcfg.eos_token_id)
        for event in self.sampler.stream(ids, cfg):
            yield tracker.apply(event)
        yield self.sampler.answers[0]


def _ar_options(cfg: SamplerConfig) -> dict[str, Any]:
    """The options a causal model decodes with; the diffusion ones do not apply to it."""
    return {"temperature": cfg.temperature, "seed": cfg.seed,
            "repetition_penalty": cfg.repetition_penalty}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to load on: ``device`` if this machine has it, else CUDA when present, else CPU.

    A name torch does not know, or CUDA asked for on a machine without it, is refused
    here with a :class:`ValueError` rather than failing deep inside the first tensor copy.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {str(device)!r}; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: no CUDA device is available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r}: only cpu and cuda are supported")
    return dev


def load(
    path_or_name: str | Path = "default",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    quant: str | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
    fast: bool | None = None,
) -> Runtime:
    """Load a checkpoint folder (or ``default`` / ``default-ar``) as a Runtime.

    ``quant`` (``int8``, ``int4``, ``fp8`` or ``w4a8``) quantizes the weights after loading;
    a checkpoint stored with that scheme (``ruvdllm quantize``) is used as stored.
    ``fast`` is :class:`Runtime`'s.
    """
    dev = resolve_device(device)
    path = resolve(path_or_name)
    model = load_model(path, dtype=dtype or torch.float32, device=dev)
    cfg = model.config
    tokenizer = Tokenizer(tokenizer_file(path), mask_token=cfg.mask_token_id,
                          eos_token=cfg.eos_token_id, pad_token=cfg.pad_token_id,
                          bos_token=cfg.bos_token_id)
    if quant not in (None, "none"):
        from ruvdllm.quant import SCHEMES, quantize_model

        if quant not in SCHEMES:
            raise SamplerError(f"unknown quantization {quant!r} (none, {', '.join(SCHEMES)})")
        stored = (cfg.quantization or {}).get("scheme")
        if stored is None:
            quantize_model(model, quant, group_size)  # type: ignore[arg-type]
        elif stored != quant:
            raise SamplerError(f"{path} is stored quantized as {stored}; load it with quant "
                               f"{stored} or none (its weights cannot be re-quantized)")
    return Runtime(model, tokenizer, fast=fast)
