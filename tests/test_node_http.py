"""The node's HTTP API in-process (ASGI through httpx's TestClient) on the embedded int8 model."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from node_agent.config import HttpSection
from node_agent.engine import Engine
from node_agent.http_api import create_app
from node_agent.local_data import LocalData
from node_agent.metrics import node_registry
from ruvdllm.runtime import Runtime, load

MODEL = "ruvdllm-default-int8"


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return load("default", quant="int8", device="cpu")


def make_client(runtime: Runtime, tmp_path: Path, **limits: int) -> tuple[TestClient, Engine]:
    metrics = node_registry()
    engine = Engine(runtime, HttpSection(default_steps=8, default_new_tokens=8, **limits),
                    metrics)
    app = create_app(engine, model_id=MODEL, data=LocalData(tmp_path / "data"),
                     metrics=metrics, health=lambda: {"status": "ok", "adapter_version": 0})
    return TestClient(app), engine


@pytest.fixture()
def client(runtime: Runtime, tmp_path: Path) -> TestClient:
    return make_client(runtime, tmp_path, max_body_bytes=4096, max_new_tokens=64)[0]


def sse_events(text: str) -> list[str]:
    return [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]


def test_completion_shape_usage_and_determinism(client: TestClient) -> None:
    body = {"prompt": "The king said", "max_tokens": 12, "steps": 12}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "text_completion" and data["model"] == MODEL
    choice = data["choices"][0]
    assert choice["finish_reason"] in ("stop", "length") and choice["text"]
    assert data["usage"]["completion_tokens"] <= 12
    assert data["usage"]["total_tokens"] == (data["usage"]["prompt_tokens"]
                                             + data["usage"]["completion_tokens"])
    assert data["system_fingerprint"] == "adapter-v0"
    assert data["ruvdllm"] == {"adapter_version": 0, "local_patterns": {}}  # no TALoRA hook
    again = client.post("/v1/completions", json=body).json()
    assert again["choices"][0]["text"] == choice["text"]  # greedy: same text


def test_max_tokens_not_a_block_multiple_is_respected(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"prompt": "Once", "max_tokens": 40, "steps": 8,
                                              "block_length": 16})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 40


def test_chat_completion(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Who was the king?"}],
        "max_completion_tokens": 8})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(data["choices"][0]["message"]["content"], str)


def test_stream_matches_non_stream(client: TestClient) -> None:
    body = {"prompt": "In the beginning", "max_tokens": 16, "steps": 16}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    r = client.post("/v1/completions", json={**body, "stream": True,
                                              "stream_options": {"include_usage": True}})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["usage"]["completion_tokens"] > 0
    assert {c["system_fingerprint"] for c in chunks} == {"adapter-v0"}  # on every chunk
    assert [c["ruvdllm"] for c in chunks if "ruvdllm" in c] == [  # on the last chunk only
        {"adapter_version": 0, "local_patterns": {}}]


def test_chat_stream_deltas(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "stream": True})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] is not None


def test_stop_string_cuts_the_answer(client: TestClient) -> None:
    base = {"prompt": "The king said", "max_tokens": 24, "steps": 24}
    text = client.post("/v1/completions", json=base).json()["choices"][0]["text"]
    stop = text.strip().split()[1]
    data = client.post("/v1/completions", json={**base, "stop": [stop]}).json()
    assert stop not in data["choices"][0]["text"]
    assert data["choices"][0]["finish_reason"] == "stop"
    streamed = sse_events(client.post("/v1/completions",
                                      json={**base, "stop": stop, "stream": True}).text)
    pieces = "".join(json.loads(e)["choices"][0]["text"] for e in streamed[:-1])
    assert pieces == data["choices"][0]["text"]


@pytest.mark.parametrize("body, fragment", [
    ({"prompt": ""}, "prompt must not be empty"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "frobnicate": 1}, "frobnicate: Extra inputs are not permitted"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "repetition_penalty": 0.5}, "repetition_penalty"),
    ({"prompt": "x", "n": 2}, "n:"),
    ({"prompt": ["a", "b"]}, "one string"),
    ({"prompt": "x", "model": "gpt-4"}, "is not served here"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop must be at most 4"),
    ({"messages": []}, "prompt: Field required"),
])
def test_bad_completion_requests_are_400(client: TestClient, body: dict, fragment: str) -> None:
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert fragment in error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, status, param, fragment", [
    ({"prompt": "x", "max_tokens": 1000}, 422, "max_tokens", "max_tokens must be between 1 and 64"),
    ({"prompt": "x", "steps": 100_000}, 422, "steps", "steps must be between"),
    ({"prompt": "x", "max_tokens": 64, "block_length": 600}, 422, "max_tokens", "context"),
    ({"prompt": "x", "seed": 2**64}, 400, "seed", "less than or equal"),
    ({"prompt": "\ud800"}, 400, "prompt", "surrogate"),
])
def test_limits_are_422_and_bad_values_400(client: TestClient, body: dict, status: int,
                                           param: str, fragment: str) -> None:
    r = client.post("/v1/completions", content=json.dumps(body),  # \ud800 stays escaped
                    headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert fragment in error["message"] and error["param"] == param


# What OpenAI client libraries send unasked: each option at its no-op value.
NO_OPS = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "user": "u"}


def test_client_library_no_op_options_are_accepted(client: TestClient) -> None:
    base = {"prompt": "The king said", "max_tokens": 8, "steps": 8}
    plain = client.post("/v1/completions", json=base).json()["choices"][0]["text"]
    r = client.post("/v1/completions", json={**base, **NO_OPS, "logprobs": None,
                                             "echo": False, "best_of": 1, "suffix": None})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == plain
    chat = {"max_tokens": 8, "steps": 8, "messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is\na river?"}]}
    plain = client.post("/v1/chat/completions", json=chat).json()
    parts = {**chat, **NO_OPS, "logprobs": False, "top_logprobs": 0, "tools": [],
             "tool_choice": "none", "response_format": {"type": "text"}, "messages": [
                 {"role": "developer", "content": [{"type": "text", "text": "Answer briefly."}]},
                 {"role": "user", "content": [{"type": "text", "text": "What is"},
                                              {"type": "text", "text": "a river?"}]}]}
    r = client.post("/v1/chat/completions", json=parts)
    assert r.status_code == 200, r.text
    assert r.json()["choices"] == plain["choices"]
    assert r.json()["usage"] == plain["usage"]


@pytest.mark.parametrize("route, extra, param", [
    ("completions", {"frequency_penalty": 0.5}, "frequency_penalty"),
    ("completions", {"logit_bias": {"50": 5}}, "logit_bias"),
    ("completions", {"echo": True}, "echo"),
    ("completions", {"logprobs": 2}, "logprobs"),
    ("chat/completions", {"response_format": {"type": "json_object"}}, "response_format.type"),
    ("chat/completions", {"tools": [{"type": "function"}]}, "tools"),
    ("chat/completions", {"logprobs": True}, "logprobs"),
])
def test_options_the_sampler_lacks_are_refused_by_name(client: TestClient, route: str,
                                                       extra: dict, param: str) -> None:
    body = ({"prompt": "x"} if route == "completions"
            else {"messages": [{"role": "user", "content": "x"}]})
    r = client.post(f"/v1/{route}", json={**body, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_bad_chat_requests_are_400(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "wizard",
                                                               "content": "hi"}]})
    assert r.status_code == 400 and "role" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]


def test_malformed_bodies(client: TestClient) -> None:
    r = client.post("/v1/completions", content=b"{not json",
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json=["a list"])
    assert r.status_code == 400
    r = client.post("/v1/completions", json={"prompt": "x" * 5000})
    assert r.status_code == 413 and "exceeds 4096 bytes" in r.json()["error"]["message"]
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = client.post("/v1/completions", content=b'{"prompt": "x"}',
                    headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    r = client.post("/v1/completions", content=b'{"prompt": "x", "temperature": NaN}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = client.post("/v1/completions", content=b"{}", headers={
        "content-type": "application/json", "content-length": "999999"})
    assert r.status_code == 413


def test_prompt_token_limit(runtime: Runtime, tmp_path: Path) -> None:
    client, _ = make_client(runtime, tmp_path, max_prompt_tokens=8)
    r = client.post("/v1/completions", json={"prompt": "one two three four five six seven "
                                                        "eight nine ten eleven"})
    assert r.status_code == 422 and "at most 8" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "prompt"


def test_concurrency_limit_answers_429(runtime: Runtime, tmp_path: Path) -> None:
    client, engine = make_client(runtime, tmp_path, max_concurrency=1)
    with engine.exclusive():  # the model is busy: the first request waits holding the slot
        first: dict[str, int] = {}
        worker = threading.Thread(target=lambda: first.update(
            code=client.post("/v1/completions", json={"prompt": "a"}).status_code))
        worker.start()
        while engine.metrics.snapshot()["requests_in_flight"].get((), 0) < 1:
            threading.Event().wait(0.01)
        r = client.post("/v1/completions", json={"prompt": "b"})
        assert r.status_code == 429 and "busy" in r.json()["error"]["message"]
        assert r.headers["retry-after"] == "1"
    worker.join(timeout=60)
    assert first["code"] == 200


def test_health_models_metrics(client: TestClient) -> None:
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/v1/models").json()["data"][0]["id"] == MODEL
    client.post("/v1/completions", json={"prompt": "a", "max_tokens": 4})
    client.post("/v1/completions", json={"prompt": ""})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert "# TYPE ruvdllm_node_generated_tokens_total counter" in text
    assert 'ruvdllm_node_http_requests_total{code="200",path="/v1/completions"}' in text
    assert 'ruvdllm_node_refusals_total{reason="limit_or_option"} 1' in text
    for line in text.splitlines():  # every sample line is "name{labels} value"
        if not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


def test_feedback_stores_accepted_completion(client: TestClient, tmp_path: Path) -> None:
    data = client.post("/v1/completions", json={"prompt": "Dear sir,", "max_tokens": 6}).json()
    r = client.post("/v1/feedback", json={"id": data["id"], "accepted": True})
    assert r.status_code == 200 and r.json()["stored"]
    saved = LocalData(tmp_path / "data").texts(10_000)
    assert saved == [("Dear sir," + data["choices"][0]["text"]).strip()]
    again = client.post("/v1/feedback", json={"id": data["id"], "accepted": True})
    assert again.status_code == 404


def test_feedback_that_cannot_be_stored_is_kept_for_a_retry(client: TestClient,
                                                            tmp_path: Path) -> None:
    data = client.post("/v1/completions", json={"prompt": "Dear sir,", "max_tokens": 6}).json()
    (tmp_path / "data").write_text("a file where the data folder should be")
    r = client.post("/v1/feedback", json={"id": data["id"], "accepted": True})
    assert r.status_code == 503 and "could not store completion" in r.json()["error"]["message"]
    (tmp_path / "data").unlink()
    r = client.post("/v1/feedback", json={"id": data["id"], "accepted": True})
    assert r.status_code == 200 and r.json()["stored"]
    assert [p.name for p in (tmp_path / "data" / "accepted").iterdir()] == [f"{data['id']}.txt"]
