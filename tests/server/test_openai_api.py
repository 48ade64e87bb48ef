"""The server end to end: a real uvicorn server driven by the openai SDK and raw httpx."""

from __future__ import annotations

import json
import socket
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from tests.server.conftest import ALIAS, MAX_MODEL_LEN, MODEL_NAME, assert_openai_error

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name three colors."}]
GREEDY = dict(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def client(server):
    return server.openai_client()


@pytest.fixture(scope="module")
def http(server):
    with server.http_client() as c:
        yield c


def sse_events(response: httpx.Response) -> list:
    """The data payloads of an SSE response, `[DONE]` included as a string."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", line
    return events


def test_models_lists_every_served_name(client, http):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME, ALIAS]
    assert http.get("/health").status_code == 200
    assert "version" in http.get("/version").json()


def test_models_retrieve(server, client, http):
    """GET /v1/models/{id} (the SDK's models.retrieve), ids with slashes included."""
    assert client.models.retrieve(ALIAS).id == ALIAS
    assert_openai_error(http.get("/v1/models/nope"), 404, "model")
    from pagedserve.server.app import build_app

    app = TestClient(build_app(server.async_engine, ["org/name-v1", MODEL_NAME]))
    card = app.get("/v1/models/org/name-v1")
    assert card.status_code == 200 and card.json()["id"] == "org/name-v1"
    assert card.json()["max_model_len"] == MAX_MODEL_LEN


def test_chat_stream_equals_non_stream_for_greedy(client):
    full = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, **GREEDY)
    choice = full.choices[0]
    assert full.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length") and choice.message.content
    chunks = list(client.chat.completions.create(
        model=ALIAS, messages=MESSAGES, stream=True,
        stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices]
    streamed = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert streamed == choice.message.content
    assert content_chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert all(c.choices[0].finish_reason is None for c in content_chunks[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage == full.usage
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    if choice.finish_reason == "length":
        assert full.usage.completion_tokens == GREEDY["max_tokens"]


def test_chat_accepts_text_parts_and_max_completion_tokens(client):
    plain = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, **GREEDY)
    parts = [MESSAGES[0], {"role": "user", "content": [
        {"type": "text", "text": "Name three"}, {"type": "text", "text": "colors."}]}]
    with_parts = client.chat.completions.create(
        model=MODEL_NAME, messages=parts, temperature=0, max_completion_tokens=3,
        extra_body={"ignore_eos": True})
    assert with_parts.usage.completion_tokens == 3
    # Parts are joined with a newline, so the prompt differs from the plain one by one token.
    assert with_parts.usage.prompt_tokens in range(plain.usage.prompt_tokens - 1,
                                                   plain.usage.prompt_tokens + 2)


def test_completions_stream_equals_non_stream_for_two_prompts(client, http):
    prompts = ["The capital of France is", "Once upon a time"]
    full = client.completions.create(model=MODEL_NAME, prompt=prompts, **GREEDY)
    assert [c.index for c in full.choices] == [0, 1]
    with http.stream("POST", "/v1/completions", json=dict(
            model=MODEL_NAME, prompt=prompts, stream=True,
            stream_options={"include_usage": True}, **GREEDY)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"] == full.usage.model_dump(exclude_none=True)
    texts = ["", ""]
    finish = [None, None]
    for event in events[:-2]:
        (choice,) = event["choices"]
        assert finish[choice["index"]] is None, "a chunk after the finishing one"
        texts[choice["index"]] += choice["text"]
        finish[choice["index"]] = choice["finish_reason"]
    assert texts == [c.text for c in full.choices]
    assert finish == [c.finish_reason for c in full.choices]


def test_completion_token_prompts_echo_and_usage(client):
    ids = [[10, 11, 12, 13], [20, 21]]
    out = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=5, temperature=0,
                                    echo=True, logprobs=2, extra_body={"ignore_eos": True})
    assert out.usage.prompt_tokens == 6 and out.usage.completion_tokens == 10
    for choice, prompt in zip(out.choices, ids):
        lp = choice.logprobs
        assert len(lp.tokens) == len(prompt) + 5 == len(lp.token_logprobs)
        assert lp.token_logprobs[0] is None  # the first prompt token has no logprob
        assert all(x <= 0 for x in lp.token_logprobs[1:])
        assert "".join(lp.tokens) == choice.text
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
        assert all(len(top) >= 2 for top in lp.top_logprobs[len(prompt):])


def test_n2_gives_two_choices_and_seed_is_reproducible(client):
    kwargs = dict(model=MODEL_NAME, messages=MESSAGES, n=2, temperature=1.0, seed=7,
                  max_tokens=8, extra_body={"ignore_eos": True})
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]
    assert texts[0] != texts[1]  # each choice has its own seed (seed + index)
    assert first.usage.completion_tokens == 2 * 8


def test_stop_strings_never_appear(client):
    base = client.completions.create(model=MODEL_NAME, prompt="Once upon a time",
                                     max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = base[len(base) // 2: len(base) // 2 + 3]
    assert stop.strip(), base
    expected = base[:base.index(stop)]
    out = client.completions.create(model=MODEL_NAME, prompt="Once upon a time",
                                    max_tokens=16, temperature=0, stop=[stop, "\x00never"],
                                    extra_body={"ignore_eos": True})
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL_NAME, prompt="Once upon a time", max_tokens=16, temperature=0, stop=stop,
        stream=True, extra_body={"ignore_eos": True}) if c.choices)
    assert streamed == expected and stop not in streamed


def test_chat_logprobs(client):
    out = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0,
                                         max_tokens=4, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry.top_logprobs[0].token == entry.token
    streamed = [lp for c in client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, temperature=0, max_tokens=4, logprobs=True,
        top_logprobs=3, stream=True) if c.choices and c.choices[0].logprobs
        for lp in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]


@pytest.mark.parametrize("path, field, value", [
    ("/v1/chat/completions", "priority", 1),  # no priority scheduling here
    ("/v1/completions", "priority", -5),
    ("/v1/chat/completions", "use_beam_search", True),
    ("/v1/completions", "length_penalty", 0.5),
    ("/v1/chat/completions", "echo", True),  # vLLM's chat echo; completions has its own
    ("/v1/chat/completions", "chat_template", "{{ messages }}"),
    ("/v1/completions", "truncate_prompt_tokens", 8),
    ("/v1/chat/completions", "cache_salt", "s"),
    ("/v1/chat/completions", "functions", [{"name": "f"}]),  # OpenAI's, deprecated
])
def test_engine_extensions_we_do_not_implement_are_400s(http, path, field, value):
    """A vLLM client's extension this server lacks would change the output if honoured:
    ignoring it silently is worse than a 400 naming it."""
    body = ({"messages": MESSAGES} if "chat" in path else {"prompt": "hi"}) | {"max_tokens": 2}
    error = assert_openai_error(http.post(path, json={**body, field: value}), 400, field)
    assert "not supported by this server" in error["message"], error


def test_neutral_extension_values_and_ignored_openai_fields_are_accepted(http):
    """What a client sends when it leaves an extension alone (its default) works, and so do
    OpenAI fields that change nothing the model writes."""
    body = {"messages": MESSAGES, "max_tokens": 2, "priority": 0, "use_beam_search": False,
            "length_penalty": 1.0, "echo": False, "bad_words": [], "truncate_prompt_tokens": None,
            "store": True, "metadata": {"k": "v"}, "service_tier": "auto", "user": "u",
            "guided_decoding_backend": "xgrammar", "prompt_cache_key": "k",
            "request_id": "trace-1", "allowed_token_ids": [], "vllm_xargs": {},
            "structured_outputs": {"regex": "[a-z]{2}", "whitespace_pattern": None}}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    completion = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2,
                                                    "echo": True, "priority": 0})
    assert completion.status_code == 200 and completion.json()["choices"][0]["text"][:2] == "hi"


def test_errors_have_openai_shape_and_server_stays_up(client, http):
    chat = dict(model=MODEL_NAME, messages=MESSAGES, max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(**{**chat, "model": "no-such-model"})
    error = assert_openai_error(
        http.post("/v1/chat/completions", json={**chat, "model": "no-such-model"}), 404, "model")
    assert error["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**chat, temperature=-1)
    assert_openai_error(http.post("/v1/chat/completions", json={**chat, "temperature": "hot"}),
                         400, "temperature")
    assert_openai_error(http.post("/v1/chat/completions", json={**chat, "messages": []}),
                         400, "messages")
    assert_openai_error(http.post("/v1/chat/completions", content=b'{"model": "tiny", ',
                                   headers={"content-type": "application/json"}), 400)
    assert_openai_error(http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "a",
                                                            "suffix": "b"}), 400, "suffix")
    assert_openai_error(http.post("/v1/completions", json={"prompt": [49152]}), 400, "prompt")
    assert_openai_error(http.post("/v1/completions", json={"prompt": "hi", "logit_bias":
                                                            {"x": 1}}), 400, "logit_bias")
    assert_openai_error(http.post("/v1/completions", json={"prompt": "hi", "min_tokens": 9,
                                                            "max_tokens": 2}), 400, "min_tokens")
    long_prompt = list(range(100, 100 + MAX_MODEL_LEN - 10))
    error = assert_openai_error(http.post("/v1/completions", json={
        "prompt": long_prompt, "max_tokens": 20}), 400, "prompt")
    assert str(MAX_MODEL_LEN) in error["message"] and str(len(long_prompt)) in error["message"]
    assert error["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match=str(MAX_MODEL_LEN)):
        client.chat.completions.create(model=MODEL_NAME, messages=[
            {"role": "user", "content": "hello " * MAX_MODEL_LEN}])
    assert_openai_error(http.get("/v1/no-such-route"), 404)
    assert http.get("/health").status_code == 200
    ok = client.chat.completions.create(**chat)
    assert ok.choices[0].message.content is not None


@pytest.fixture
def abort_spy(server):
    """Records the ids of requests the engine aborted while they were still live."""
    llm = server.async_engine.engine
    aborted: list[str] = []
    real_abort = llm.abort_request

    def spy(request_ids):
        outputs = real_abort(request_ids)
        aborted.extend(o.request_id for o in outputs)
        return outputs

    llm.abort_request = spy
    yield aborted
    del llm.abort_request


def _wait_until_idle(server, free_before: int, aborted: list[str]) -> None:
    llm = server.async_engine.engine
    deadline = time.monotonic() + 20
    while not (aborted and llm.kv_cache_manager.num_free_blocks == free_before
               and not llm.has_unfinished_requests()):
        assert time.monotonic() < deadline, (aborted, llm.kv_cache_manager.num_free_blocks)
        time.sleep(0.01)
    stats = server.async_engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0


LONG = dict(model=MODEL_NAME, prompt="Once upon a time", max_tokens=200, temperature=0,
            ignore_eos=True)


def test_client_disconnect_mid_stream_aborts_and_frees_blocks(server, http, abort_spy):
    free_before = server.async_engine.engine.kv_cache_manager.num_free_blocks
    aborted_before = _scrape(http).get("pagedserve_request_aborted_total", 0.0)
    with http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # generation has started
    _wait_until_idle(server, free_before, abort_spy)
    assert len(abort_spy) == 1 and abort_spy[0].startswith("cmpl-")
    assert _scrape(http)["pagedserve_request_aborted_total"] == aborted_before + 1
    assert http.get("/health").status_code == 200
    assert http.post("/v1/completions", json={**LONG, "max_tokens": 2}).status_code == 200


def test_client_disconnect_before_a_non_streamed_answer_aborts(server, http, abort_spy):
    llm = server.async_engine.engine
    free_before = llm.kv_cache_manager.num_free_blocks
    body = json.dumps({**LONG, "max_tokens": 240}).encode()
    host, port = server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 20
        while not llm.has_unfinished_requests():  # wait until the engine has it
            assert time.monotonic() < deadline
            time.sleep(0.001)
    _wait_until_idle(server, free_before, abort_spy)
    assert len(abort_spy) == 1 and abort_spy[0].startswith("cmpl-")
    assert http.get("/health").status_code == 200


def test_tokenize_and_detokenize(client, http):
    tokens = http.post("/tokenize", json={"model": MODEL_NAME, "prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    assert tokens["max_model_len"] == MAX_MODEL_LEN
    text = http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
    assert text == "Hello world"
    chat = http.post("/tokenize", json={"messages": MESSAGES}).json()
    usage = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES,
                                           max_tokens=1).usage
    assert chat["count"] == usage.prompt_tokens
    assert_openai_error(http.post("/tokenize", json={"prompt": "a", "model": "nope"}), 404)
    assert_openai_error(http.post("/detokenize", json={"tokens": [-1]}), 400, "tokens")


def _scrape(http) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    response = http.get("/metrics")
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return samples


def test_metrics_count_tokens_and_latencies(client, http):
    before = _scrape(http)
    out = client.completions.create(model=MODEL_NAME, prompt=[[5, 6, 7], [8, 9]], n=2,
                                    max_tokens=4, temperature=0,
                                    extra_body={"ignore_eos": True})
    after = _scrape(http)

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert grew("pagedserve_prompt_tokens_total") == out.usage.prompt_tokens == 5
    assert grew("pagedserve_generation_tokens_total") == out.usage.completion_tokens == 16
    assert grew("pagedserve_request_success_total{finished_reason=length}") == 4
    assert grew("pagedserve_time_to_first_token_seconds_count") == 2  # one per prompt
    assert grew("pagedserve_e2e_request_latency_seconds_count") == 2
    assert grew("pagedserve_inter_token_latency_seconds_count") >= 2
    assert after["pagedserve_num_requests_running"] == 0
    assert 0.0 <= after["pagedserve_kv_cache_usage_perc"] <= 1.0
    assert after["pagedserve_engine_healthy"] == 1.0
    assert "pagedserve_prefix_cache_queries_total" in after


def test_32_concurrent_streams_complete_and_match_one_batched_request(server, client):
    import asyncio

    prompts = [f"Story number {i}:" for i in range(32)]
    batched = client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=6,
                                        temperature=0)

    async def stream_all() -> list[str]:
        async_client = openai.AsyncOpenAI(base_url=server.v1, api_key="unused",
                                          max_retries=0, timeout=60)

        async def one(prompt: str) -> str:
            stream = await async_client.completions.create(
                model=MODEL_NAME, prompt=prompt, max_tokens=6, temperature=0, stream=True)
            pieces, finish = [], None
            async for chunk in stream:
                pieces.append(chunk.choices[0].text)
                finish = chunk.choices[0].finish_reason or finish
            assert finish in ("stop", "length")
            return "".join(pieces)

        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await async_client.close()

    assert asyncio.run(stream_all()) == [c.text for c in batched.choices]
