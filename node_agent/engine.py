"""Serialised use of the served model: admission, one generation at a time, hot swaps between.

Every generation (HTTP or gRPC) runs on a worker thread that holds the model lock from its
first forward to its last, so the adapter mix a request sees is the one in place when it
started, end to end. A merged-adapter swap takes the same lock (:meth:`Engine.exclusive`),
so it lands between two requests and never fails one in flight; it goes before the requests
still waiting for the model, so a steady queue cannot hold a new version back (measured by
tests/test_load.py: with a plain lock, 11 queued streams all ran before the swap). The
worker feeds a :class:`Job` queue; callers read chunks from it and may cancel (a client that
went away), which stops the worker at the next denoising step and releases the lock.

Admission is bounded: at most ``max_concurrency`` requests are admitted (running or waiting
for the lock); the next is refused with :class:`Busy`, which the APIs answer with 429.

Local patterns: when the node's TALoRA store holds any, each request's retrieval is keyed
by its prompt's embedding (``learn.prompt_embedding``: mean-pooled final hidden state under
the base model, the key local training stores patterns under), set on the
:class:`PatternHook` with the lock held and cleared when the request ends; the final chunk
names the patterns the request used and their largest weight.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from node_agent.config import HttpSection
from node_agent.metrics import Registry
from ruvdllm.learn import prompt_embedding
from ruvdllm.runtime import Runtime
from ruvdllm.sampler import AnswerTracker, SamplerConfig, SamplerError

log = logging.getLogger(__name__)

# Answers longer than this are denoised in semi-autoregressive blocks of this length.
BLOCK = 32
MAX_TEMPERATURE = 2.0  # OpenAI's range, for HTTP and gRPC alike


class RequestError(ValueError):
    """A generation request that cannot be served as asked (answered with 400)."""


class LimitExceeded(RequestError):
    """A well-formed request over one of the node's configured limits (answered with 422)."""

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param


class Busy(RuntimeError):
    """No admission slot free, or the model stayed busy past the timeout (429 / 503)."""

    def __init__(self, message: str, *, queued: bool) -> None:
        super().__init__(message)
        self.queued = queued


@dataclass
class Generation:
    """A validated request: prompt text and ids, answer cap, sampler settings, stop strings."""

    prompt_text: str
    prompt_ids: list[int]
    max_tokens: int
    sampler: SamplerConfig
    stop: tuple[str, ...] = ()


@dataclass
class Chunk:
    """Text committed since the previous chunk; the last one has ``done`` and totals."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    step: int = 0
    done: bool = False
    finish_reason: str = ""  # "stop" (EOS or a stop string), "length" or "cancelled"
    forwards: int = 0
    completion_tokens: int = 0
    adapter_version: int = 0
    local_patterns: dict[int, float] = field(default_factory=dict)  # id -> largest weight


class PatternHook(Protocol):
    """The sampler hook that retrieves local patterns (node_agent.adapters)."""

    used: dict[int, float]

    def has_patterns(self) -> bool:
        """Whether there is any local pattern to retrieve."""
        ...

    def set_query(self, query: np.ndarray | None) -> None:
        """Key the coming forwards' retrieval (None: global adapters only)."""
        ...


class Job:
    """The chunks of one running generation, produced by the engine's worker thread."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Chunk | BaseException] = queue.Queue()
        self._cancel = threading.Event()

    def cancel(self) -> None:
        """Ask the worker to stop at its next step (the reader is gone)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def put(self, item: Chunk | BaseException) -> None:
        self._queue.put(item)

    def get(self) -> Chunk:
        """The next chunk; re-raises an error of the worker."""
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def __iter__(self) -> Iterator[Chunk]:
        while True:
            chunk = self.get()
            yield chunk
            if chunk.done:
                return

    def result(self) -> Chunk:
        """Run to the end: one chunk with the whole text and the final totals."""
        text, ids = [], []
        for chunk in self:
            text.append(chunk.text)
            ids.extend(chunk.token_ids)
            if chunk.done:
                return Chunk("".join(text), ids, chunk.step, True, chunk.finish_reason,
                             chunk.forwards, chunk.completion_tokens, chunk.adapter_version,
                             chunk.local_patterns)
        raise RuntimeError("generation ended without a final chunk")


def _stop_at(text: str, stop: tuple[str, ...]) -> int | None:
    """Index of the earliest stop string in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


class Engine:
    """The served model behind one lock; see the module docstring."""

    def __init__(self, runtime: Runtime, limits: HttpSection, metrics: Registry,
                 patterns: PatternHook | None = None) -> None:
        self.runtime = runtime
        self.limits = limits
        self.metrics = metrics
        self.patterns = patterns
        metrics.describe("local_pattern_requests_total", "counter",
                         "Generations that retrieved at least one local TALoRA pattern")
        self.adapter_version = 0
        self._lock = threading.Lock()
        self._no_swap = threading.Event()  # cleared while a swap waits for or holds the model
        self._no_swap.set()
        self._swaps = threading.Lock()  # one swap at a time
        self._slots = threading.BoundedSemaphore(limits.max_concurrency)
        self._in_flight = 0
        self._count_lock = threading.Lock()

    # --- requests -------------------------------------------------------------------------

    def encode(self, prompt: str | Sequence[Mapping[str, str]]) -> tuple[str, list[int]]:
        """Prompt text and ids of a text, or of chat messages in the chat template."""
        tok = self.runtime.tokenizer
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("prompt must not be empty")
            text = prompt
        elif not prompt:
            raise RequestError("messages must not be empty")
        else:
            try:
                text = tok.apply_chat_template([dict(m) for m in prompt])
            except ValueError as err:
                raise RequestError(str(err)) from None
        return text, tok.encode(text, add_bos=tok.bos_token_id is not None)

    def prepare(self, prompt: str | Sequence[Mapping[str, str]], *,
                max_tokens: int | None = None,
                steps: int | None = None, block_length: int | None = None,
                temperature: float = 0.0, threshold: float | None = None, seed: int = 0,
                repetition_penalty: float = 1.2,
                stop: tuple[str, ...] = ()) -> Generation:
        """Check a request against the node's limits and turn it into a Generation.

        The answer is denoised in ``gen_length`` = ``max_tokens`` rounded up to whole
        blocks (one block up to 2·BLOCK tokens) and cut at ``max_tokens``; ``steps`` is
        rounded up to a multiple of the number of blocks.
        """
        lim = self.limits
        text, ids = self.encode(prompt)
        if len(ids) > lim.max_prompt_tokens:
            raise LimitExceeded(f"prompt is {len(ids)} tokens; this node accepts at most "
                                f"{lim.max_prompt_tokens}", param="prompt")
        n = lim.default_new_tokens if max_tokens is None else max_tokens
        if not 1 <= n <= lim.max_new_tokens:
            raise LimitExceeded(f"max_tokens must be between 1 and {lim.max_new_tokens}, got {n}",
                                param="max_tokens")
        if block_length is None:
            block_length = n if n <= 2 * BLOCK else BLOCK
        if block_length < 1:
            raise RequestError(f"block_length must be positive, got {block_length}")
        blocks = -(-n // block_length)
        gen_length = blocks * block_length
        want = lim.default_steps if steps is None else steps
        if not 1 <= want <= lim.max_steps:
            raise LimitExceeded(f"steps must be between 1 and {lim.max_steps}, got {want}",
                                param="steps")
        steps_used = -(-max(want, blocks) // blocks) * blocks
        max_len = self.runtime.model.config.max_sequence_length
        if len(ids) + gen_length > max_len:
            raise LimitExceeded(f"prompt ({len(ids)} tokens) + answer ({gen_length}) exceeds "
                                f"the model's {max_len}-token context", param="max_tokens")
        if not 0.0 <= temperature <= MAX_TEMPERATURE:  # NaN fails too
            raise RequestError(f"temperature must be between 0 and {MAX_TEMPERATURE}, "
                               f"got {temperature}")
        if any(not s for s in stop) or len(stop) > 4:
            raise RequestError("stop must be at most 4 non-empty strings")
        cfg = SamplerConfig(steps=steps_used, gen_length=gen_length, block_length=block_length,
                            temperature=temperature, threshold=threshold, seed=seed,
                            repetition_penalty=repetition_penalty, early_stop=True)
        try:
            cfg.validate(max_len, len(ids))
        except SamplerError as err:
            raise RequestError(str(err)) from None
        return Generation(text, ids, n, cfg, stop)

    def submit(self, gen: Generation) -> Job:
        """Admit a request and start its worker; raises Busy when every slot is taken."""
        if not self._slots.acquire(blocking=False):
            self.metrics.inc("refusals_total", reason="busy")
            log.warning("refused a generation: %d requests already admitted",
                        self.limits.max_concurrency)
            raise Busy(f"node busy: {self.limits.max_concurrency} requests already in progress",
                       queued=False)
        job = Job()
        self._track(+1)
        threading.Thread(target=self._work, args=(gen, job), daemon=True,
                         name="generation").start()
        return job

    def _track(self, delta: int) -> None:
        with self._count_lock:
            self._in_flight += delta
            self.metrics.set("requests_in_flight", self._in_flight)

    def _work(self, gen: Generation, job: Job) -> None:
        try:
            if not self._acquire_model(time.monotonic() + self.limits.request_timeout_s):
                self.metrics.inc("refusals_total", reason="timeout")
                log.warning("refused a generation: model busy for %.0f s",
                            self.limits.request_timeout_s)
                job.put(Busy(f"model busy for {self.limits.request_timeout_s:.0f} s",
                             queued=True))
                return
            try:
                self._key_request(gen)
                self._generate(gen, job)
            finally:
                if self.patterns is not None:
                    self.patterns.set_query(None)
                self._lock.release()
        except Exception as err:  # delivered to the reader, which answers 500
            log.exception("generation failed")
            job.put(err)
        finally:
            self._slots.release()
            self._track(-1)

    def _acquire_model(self, deadline: float) -> bool:
        """Take the model lock for a generation, letting any pending swap go first."""
        while True:
            if not self._no_swap.wait(max(0.0, deadline - time.monotonic())):
                return False
            if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                return False
            if self._no_swap.is_set():
                return True
            self._lock.release()  # a swap started waiting meanwhile: it goes first

    def _key_request(self, gen: Generation) -> None:
        """Key local-pattern retrieval by the prompt's embedding, if there are patterns."""
        if self.patterns is None or not self.patterns.has_patterns():
            return
        rt = self.runtime
        self.patterns.set_query(prompt_embedding(rt.model, rt.tokenizer, [gen.prompt_text]))

    def _generate(self, gen: Generation, job: Job) -> None:
        """Denoise, emitting the in-order committed prefix as it grows (lock held)."""
        rt, t0 = self.runtime, time.perf_counter()
        version = self.adapter_version
        mcfg = rt.model.config
        tracker = AnswerTracker(len(gen.prompt_ids), gen.sampler.gen_length,
                                mcfg.mask_token_id, mcfg.eos_token_id)
        sent_ids: list[int] = []
        prefix: list[int] = []
        sent_text, text, forwards, reason, step = "", "", 0, "", 0
        hold = max((len(s) for s in gen.stop), default=1) - 1

        def emit(ready: str) -> None:
            nonlocal sent_text, sent_ids
            if ready.startswith(sent_text) and len(ready) > len(sent_text):
                job.put(Chunk(ready[len(sent_text):], prefix[len(sent_ids):], step,
                              adapter_version=self.adapter_version))
                sent_text, sent_ids = ready, list(prefix)

        for event in rt.sampler.stream([gen.prompt_ids], gen.sampler):
            forwards, step = forwards + 1, event.step + 1
            prefix = tracker.apply(event)
            if tracker.ended:
                reason = "stop"
            if len(prefix) >= gen.max_tokens:
                prefix, reason = prefix[: gen.max_tokens], reason or "length"
            text = rt.tokenizer.decode(prefix)
            cut = _stop_at(text, gen.stop)
            if cut is not None:
                text, reason = text[:cut], "stop"
            if job.cancelled:
                reason = "cancelled"
            emit(text if reason else text[: max(len(sent_text), len(text) - hold)])
            if reason:
                break
        if not reason:  # the schedule ended without EOS before max_tokens
            emit(text)
            reason = "length"
        elapsed = time.perf_counter() - t0
        self.metrics.inc("generations_total", finish_reason=reason)
        self.metrics.inc("generated_tokens_total", len(sent_ids))
        self.metrics.inc("prompt_tokens_total", len(gen.prompt_ids))
        self.metrics.inc("generation_seconds_total", elapsed)
        self.metrics.inc("model_forwards_total", forwards)
        used: dict[int, float] = {}
        if self.patterns is not None:  # end the query before the reader sees the last chunk
            used = dict(self.patterns.used)
            self.patterns.set_query(None)
        if used:
            self.metrics.inc("local_pattern_requests_total")
        job.put(Chunk("", [], step, True, reason, forwards, len(sent_ids), version, used))

    # --- hot swap -------------------------------------------------------------------------

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the model between requests (adapter swaps); waits for the running one and
        goes before the waiting ones."""
        with self._swaps:
            self._no_swap.clear()
            try:
                with self._lock:
                    yield
            finally:
                self._no_swap.set()
