"""The node's HTTP API (ASGI, FastAPI): OpenAI-compatible completions, health and metrics.

    POST /v1/completions         {"prompt": str, "max_tokens", "stream", ...}
    POST /v1/chat/completions    {"messages": [{"role", "content"}], ...}
    POST /v1/feedback            {"id": completion id, "accepted": true} → local training text
    GET  /v1/models, /health, /metrics (Prometheus text)

Streaming answers are Server-Sent Events in OpenAI's chunk format, ending with
``data: [DONE]``. Extensions to OpenAI's parameters: ``steps``, ``block_length``,
``threshold`` and ``repetition_penalty`` (the diffusion sampler's; the penalty defaults
to the measured 1.2 of docs/model_card.md); ``system_fingerprint`` names the adapter version
that served the request. OpenAI options the sampler lacks are accepted at their no-op values
(client libraries send ``frequency_penalty: 0``, ``logit_bias: {}``, ``tools: []`` unasked)
and refused, by name, at any other.

Every streamed chunk's ``system_fingerprint`` is ``adapter-v<N>``, the version in place
when the chunk was produced; a hot swap waits for the request in flight (see
:mod:`node_agent.engine`), so every chunk of one answer names the same version.

The answer (and a stream's last chunk, the one with ``finish_reason``) also carries a
non-standard field ``ruvdllm``: ``{"adapter_version": N, "local_patterns": {"<id>": w}}``,
the merged adapter version that served it and the node's own TALoRA patterns retrieved for
it, each with the largest mix weight it had (empty when none was used). OpenAI clients
ignore unknown fields.

Every refusal is a 4xx with OpenAI's error body ``{"error": {"message", "type", "param",
"code"}}``, a ``refusals_total{reason}`` count and a log line giving the reason: malformed
JSON or fields (400), a body over ``http.max_body_bytes`` (413), a prompt over
``http.max_prompt_tokens``, an answer over ``http.max_new_tokens`` or the model's context,
or steps over ``http.max_steps`` (422), no admission slot of ``http.max_concurrency`` (429,
with ``Retry-After``); the model busy past ``http.request_timeout_s`` is a 503. None of
them runs the model or changes the node's state.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Annotated, Any, Literal

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from node_agent.engine import (
    MAX_TEMPERATURE,
    Busy,
    Chunk,
    Engine,
    Generation,
    Job,
    LimitExceeded,
    RequestError,
)
from node_agent.local_data import LocalData
from node_agent.metrics import Registry

log = logging.getLogger(__name__)

# Completions remembered for /v1/feedback (oldest forgotten first).
REMEMBERED = 256
# Seconds a client refused with 429 is asked to wait (one short generation's time).
RETRY_AFTER_S = 1
# Largest seed the sampler's torch.Generator accepts as a signed 64-bit value.
MAX_SEED = 2**63 - 1
JSON_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/feedback")
ROUTES = (*JSON_ROUTES, "/v1/models", "/health", "/metrics")


def _unicode(value: str) -> str:
    """Refuse strings that are not Unicode text: JSON allows lone UTF-16 surrogates
    (``"\\ud800"``), which no tokenizer can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone UTF-16 surrogate, which is not Unicode text") from None
    return value


Text = Annotated[str, AfterValidator(_unicode)]


class _Params(BaseModel):
    """Generation parameters shared by both endpoints; unknown fields are refused.

    JSON's non-standard ``NaN``/``Infinity`` literals (which Python's parser accepts) are
    refused too, so no float reaches the sampler without passing its range check.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: Text | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float = Field(default=1.0, ge=1.0, le=1.0,
                         description="only 1.0: the sampler has no nucleus truncation")
    n: int = Field(default=1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    stop: Text | list[Text] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    user: Text | None = None
    steps: int | None = Field(default=None, ge=1)
    block_length: int | None = Field(default=None, ge=1)
    threshold: float | None = Field(default=None, gt=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.2, ge=1.0, le=3.0)
    # OpenAI options the sampler does not have, accepted only at their no-op values, which
    # client libraries send unasked (LangChain sends both penalties as 0, logit_bias {}).
    frequency_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    presence_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=0)


class CompletionRequest(_Params):
    prompt: Text | list[Text]
    logprobs: None = None  # no-op values only, as above
    echo: Literal[False] = False
    best_of: Literal[1] | None = None
    suffix: None = None


class TextPart(BaseModel):
    """A chat message's content part; only text (no images or audio)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's new system
    content: Text | list[TextPart]
    name: Text | None = None

    def as_turn(self) -> dict[str, str]:
        """The turn the chat template reads: text parts joined by newlines."""
        content = self.content
        text = content if isinstance(content, str) else "\n".join(p.text for p in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]


class ChatRequest(_Params):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: Literal[False] | None = None  # no-op values only, as in _Params
    top_logprobs: Literal[0] | None = None
    response_format: TextFormat | None = None
    tools: list[Any] | None = Field(default=None, max_length=0)
    tool_choice: Literal["none"] | None = None


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: Text
    accepted: bool


def _error(status: int, message: str, kind: str, param: str | None = None,
           headers: Mapping[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def _declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The request's ``Content-Length`` as an int, None if absent or not a number."""
    for name, value in headers:
        if name.lower() == b"content-length":
            return int(value) if value.strip().isdigit() else None
    return None


def _json_content_type(headers: list[tuple[bytes, bytes]]) -> bool:
    """True when the request's ``Content-Type`` is JSON (``*/json``, ``*+json``)."""
    for name, value in headers:
        if name.lower() == b"content-type":
            kind = value.split(b";", 1)[0].strip().lower()
            return kind.endswith(b"/json") or kind.endswith(b"+json")
    return False


class _Guard:
    """ASGI middleware: body-size limit (413), JSON content type on POST (415), and
    per-path request counts for /metrics.

    A declared ``Content-Length`` over the limit is refused before reading; otherwise the
    body is read up to the limit before the app sees it (bodies here are small JSON), so an
    oversized or lying ``Content-Length`` is refused without parsing anything.
    """

    def __init__(self, app: ASGIApp, max_body: int, metrics: Registry) -> None:
        self.app, self.max_body, self.metrics = app, max_body, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in ROUTES else "other"
        status = {"code": 500}

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            declared = _declared_length(scope["headers"])
            if (scope["method"] == "POST" and scope["path"] in JSON_ROUTES
                    and not _json_content_type(scope["headers"])):
                self.metrics.inc("refusals_total", reason="content_type")
                log.warning("refused %s: Content-Type is not JSON", scope["path"])
                await _error(415, "Content-Type must be application/json",
                             "invalid_request_error")(scope, receive, counting_send)
                return
            body, too_big = b"", declared is not None and declared > self.max_body
            more = not too_big
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_body:
                    too_big = True
                    break
            if too_big:
                self.metrics.inc("refusals_total", reason="body_too_large")
                log.warning("refused %s: body over %d bytes", scope["path"], self.max_body)
                await _error(413, f"request body exceeds {self.max_body} bytes",
                             "invalid_request_error")(scope, receive, counting_send)
                return
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, counting_send)
        finally:
            self.metrics.inc("http_requests_total", path=path, code=str(status["code"]))


_UNION_TAGS = {"str", "int", "float", "bool"}


def _where(loc: Sequence[int | str]) -> str | None:
    """A validation error's field path (``messages.0.role``) without the ``body`` root and
    pydantic's union-member tags (``str``, ``list[...]``, ``function-after[...]``)."""
    parts = [str(p) for p in loc[1:] if isinstance(p, int) or (p not in _UNION_TAGS
                                                                 and "[" not in p)]
    return ".".join(parts) or None


def _stop(value: str | list[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def create_app(engine: Engine, *, model_id: str, data: LocalData, metrics: Registry,
               health: Callable[[], Mapping[str, Any]]) -> FastAPI:
    """The ASGI app of one node; ``health`` returns the node's state for /health."""
    app = FastAPI(title="ruvdllm node", docs_url=None, redoc_url=None, openapi_url=None)
    remembered: OrderedDict[str, tuple[str, str]] = OrderedDict()

    def refuse(request: Request, status: int, message: str, kind: str, reason: str,
               param: str | None = None, headers: Mapping[str, str] | None = None,
               counted: bool = False) -> JSONResponse:
        """Log and answer a refusal; ``counted``: the engine already counted it."""
        if not counted:
            metrics.inc("refusals_total", reason=reason)
        log.warning("refused %s %s (%d %s): %s", request.method, request.url.path, status,
                    reason, message)
        return _error(status, message, kind, param, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            if err.get("type") == "json_invalid":
                problems.append(f"body is not valid JSON ({err.get('ctx', {}).get('error')})")
                continue
            if err.get("type") == "model_attributes_type":
                problems.append("body must be a JSON object")
                continue
            problems.append(f"{_where(err.get('loc', ())) or 'body'}: "
                            f"{err.get('msg', 'invalid')}")
        first = exc.errors()[0] if exc.errors() else {}
        param = None if first.get("type") == "json_invalid" else _where(first.get("loc", ()))
        return refuse(request, 400, "invalid request: " + "; ".join(dict.fromkeys(problems)),
                      "invalid_request_error", "invalid_request", param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return refuse(request, exc.status_code, str(exc.detail), "invalid_request_error",
                      f"http_{exc.status_code}")

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, exc: RequestError) -> JSONResponse:
        return refuse(request, 400, str(exc), "invalid_request_error", "limit_or_option")

    @app.exception_handler(LimitExceeded)
    async def over_limit(request: Request, exc: LimitExceeded) -> JSONResponse:
        return refuse(request, 422, str(exc), "invalid_request_error", f"limit_{exc.param}",
                      exc.param)

    @app.exception_handler(Busy)
    async def busy(request: Request, exc: Busy) -> JSONResponse:
        if exc.queued:
            return refuse(request, 503, str(exc), "server_busy", "timeout", counted=True)
        return refuse(request, 429, str(exc), "server_busy", "busy", counted=True,
                      headers={"Retry-After": str(RETRY_AFTER_S)})

    def prepare(params: _Params, prompt: str | list[dict[str, str]],
                max_tokens: int | None) -> Generation:
        if params.model not in (None, model_id):
            raise RequestError(f"model {params.model!r} is not served here; use {model_id!r}")
        return engine.prepare(prompt, max_tokens=max_tokens, steps=params.steps,
                              block_length=params.block_length,
                              temperature=params.temperature, threshold=params.threshold,
                              seed=params.seed or 0, stop=_stop(params.stop),
                              repetition_penalty=params.repetition_penalty)

    def remember(cid: str, gen: Generation, text: str) -> None:
        remembered[cid] = (gen.prompt_text, text)
        while len(remembered) > REMEMBERED:
            remembered.popitem(last=False)

    async def next_chunk(job: Job) -> Chunk:
        return await anyio.to_thread.run_sync(job.get, abandon_on_cancel=True)

    async def complete(job: Job) -> Chunk:
        try:
            return await anyio.to_thread.run_sync(job.result, abandon_on_cancel=True)
        finally:
            job.cancel()

    def usage(gen: Generation, final: Chunk) -> dict[str, int]:
        prompt = len(gen.prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": final.completion_tokens,
                "total_tokens": prompt + final.completion_tokens}

    def extension(final: Chunk) -> dict[str, Any]:
        """The non-standard ``ruvdllm`` field of an answer's last chunk (module docstring)."""
        return {"adapter_version": final.adapter_version,
                "local_patterns": {str(pid): w for pid, w in final.local_patterns.items()}}

    def sse(job: Job, gen: Generation, cid: str, params: _Params,
            shape: Callable[[str, str | None, bool], dict[str, Any]]) -> StreamingResponse:
        include_usage = bool((params.stream_options or {}).get("include_usage"))

        async def events() -> AsyncIterator[str]:
            text, first = [], True
            try:
                while True:
                    try:
                        chunk = await next_chunk(job)
                    except Exception as err:  # the worker failed mid-stream
                        log.warning("stream %s ended by an error: %s", cid, err)
                        body = {"error": {"message": str(err), "type": "server_error"}}
                        yield f"data: {json.dumps(body)}\n\n"
                        return
                    fingerprint = f"adapter-v{chunk.adapter_version}"
                    if chunk.text or first:
                        text.append(chunk.text)
                        piece = shape(chunk.text, None, first)
                        piece["system_fingerprint"] = fingerprint
                        yield f"data: {json.dumps(piece)}\n\n"
                        first = False
                    if chunk.done:
                        last = shape("", chunk.finish_reason, False)
                        last["system_fingerprint"] = fingerprint
                        last["ruvdllm"] = extension(chunk)
                        if include_usage:
                            last["usage"] = usage(gen, chunk)
                        yield f"data: {json.dumps(last)}\n\n"
                        yield "data: [DONE]\n\n"
                        remember(cid, gen, "".join(text))
                        return
            finally:
                job.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest) -> Response:
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise RequestError(f"prompt must be one string (got a list of {len(prompts)})")
        gen = prepare(req, prompts[0], req.max_tokens)
        job = engine.submit(gen)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def shape(text: str, finish: str | None, _first: bool) -> dict[str, Any]:
            return {"id": cid, "object": "text_completion", "created": created,
                    "model": model_id, "choices": [{"text": text, "index": 0, "logprobs": None,
                                                    "finish_reason": finish}]}

        if req.stream:
            return sse(job, gen, cid, req, shape)
        final = await complete(job)
        remember(cid, gen, final.text)
        body = shape(final.text, final.finish_reason, False)
        body.update(usage=usage(gen, final),
                    system_fingerprint=f"adapter-v{final.adapter_version}",
                    ruvdllm=extension(final))
        return JSONResponse(body)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(req: ChatRequest) -> Response:
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            raise RequestError("give max_tokens or max_completion_tokens, not both")
        messages = [m.as_turn() for m in req.messages]
        gen = prepare(req, messages, req.max_completion_tokens or req.max_tokens)
        job = engine.submit(gen)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def shape(text: str, finish: str | None, first: bool) -> dict[str, Any]:
            delta: dict[str, str] = {"role": "assistant"} if first else {}
            if text:
                delta["content"] = text
            return {"id": cid, "object": "chat.completion.chunk", "created": created,
                    "model": model_id, "choices": [{"index": 0, "delta": delta,
                                                    "finish_reason": finish}]}

        if req.stream:
            return sse(job, gen, cid, req, shape)
        final = await complete(job)
        remember(cid, gen, final.text)
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": created, "model": model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": final.text},
                         "finish_reason": final.finish_reason}],
            "usage": usage(gen, final),
            "system_fingerprint": f"adapter-v{final.adapter_version}",
            "ruvdllm": extension(final)})

    @app.post("/v1/feedback")
    async def feedback(req: FeedbackRequest, request: Request) -> JSONResponse:
        if req.id not in remembered:
            return refuse(request, 404, f"no recent completion with id {req.id!r}",
                          "invalid_request_error", "unknown_completion", "id")
        prompt, answer = remembered[req.id]
        stored = None
        if req.accepted:
            try:
                stored = await anyio.to_thread.run_sync(data.accept, req.id, prompt, answer)
            except OSError as err:  # kept: the client may send the same feedback again
                return refuse(request, 503, f"could not store completion {req.id}: "
                              f"{err.strerror or err}; try again later", "server_error",
                              "storage")
            log.info("accepted completion %s stored as local training text", req.id)
        remembered.pop(req.id, None)
        return JSONResponse({"id": req.id, "accepted": req.accepted,
                             "stored": stored is not None})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": 0, "owned_by": "ruvdllm"}]})

    @app.get("/health")
    async def health_endpoint() -> JSONResponse:
        return JSONResponse(dict(health()))

    @app.get("/metrics")
    async def metrics_endpoint() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_middleware(_Guard, max_body=engine.limits.max_body_bytes, metrics=metrics)
    return app
