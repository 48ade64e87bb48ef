"""Streaming is O(new) per chunk: over a 2,000-token stream the server handles engine
outputs and sends SSE chunks whose sizes do not grow with what was generated before, and
the readers that split a chat choice's text (reasoning, tool calls, Responses items) do
work per chunk that does not grow either."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from tests.server.conftest import MODEL_NAME, make_async_engine, start_server, stop_server
from tests.tiny_models import build_tiny_model

NUM_TOKENS = 2000


@pytest.fixture(scope="module")
def recording_server(tmp_path_factory):
    """A server whose serving layer records the size of every engine output it handles."""
    from pagedserve.server.app import build_app

    model_dir = build_tiny_model(tmp_path_factory.mktemp("tiny-2k"), "llama",
                                 vocab_size=49152, max_position_embeddings=2304)
    async_engine = make_async_engine(model_dir)
    app = build_app(async_engine, [MODEL_NAME])
    serving = app.state.serving
    handled: list[tuple[int, int, int]] = []  # (token ids, text chars, logprob entries)
    generate = serving.generate

    async def recording_generate(request_id, prompt, params):
        async for output in generate(request_id, prompt, params):
            for out in output.outputs:
                handled.append((len(out.token_ids), len(out.text),
                                len(out.logprobs) if out.logprobs is not None else 0))
            yield output

    serving.generate = recording_generate
    running = start_server(app, async_engine)
    yield running, handled
    stop_server(running)


def _stream_chunk_sizes(running, path: str, body: dict) -> list[tuple[int, dict]]:
    chunks = []
    with running.http_client() as http, http.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append((len(line), json.loads(line[len("data: "):])))
    return chunks


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Count on."}],
                              "logprobs": True, "top_logprobs": 3}),
    ("/v1/completions", {"prompt": "Once upon a time", "logprobs": 3}),
])
def test_a_2000_token_stream_costs_the_same_per_chunk_at_its_end(recording_server, path, body):
    running, handled = recording_server
    handled.clear()
    body = {**body, "model": MODEL_NAME, "max_tokens": NUM_TOKENS, "ignore_eos": True,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    chunks = _stream_chunk_sizes(running, path, body)
    assert chunks[-1][1]["usage"]["completion_tokens"] == NUM_TOKENS

    # Every output the server handled holds one step's new token (and its logprobs), however
    # many came before: no cumulative token lists, text or logprob lists.
    assert sum(tokens for tokens, _, _ in handled) == NUM_TOKENS
    assert max(tokens for tokens, _, _ in handled) == 1
    assert max(entries for _, _, entries in handled) == 1
    # Each piece of text is handled once: the pieces add up to the streamed text exactly.
    choices = [chunk["choices"][0] for _, chunk in chunks if chunk["choices"]]
    streamed = "".join((c.get("delta") or {}).get("content") or c.get("text") or ""
                       for c in choices)
    assert len(streamed) > NUM_TOKENS
    assert sum(chars for _, chars, _ in handled) == len(streamed)
    assert max(chars for _, chars, _ in handled) <= 200  # a token's text, not the output's
    # And the bytes sent per chunk stay flat (they vary with each token's text, and an
    # output's whole text or logprobs would make late chunks tens of KB).
    sizes = [size for size, chunk in chunks if chunk["choices"]]
    assert len(sizes) >= NUM_TOKENS
    early, late = sizes[10:210], sizes[-200:]
    assert max(sizes) < 2048
    assert sum(late) < 1.5 * sum(early), (sum(early), sum(late))


def _allocation_peaks(feed, pieces: list[str]) -> list[int]:
    """For each piece: how far feed(piece) raised traced memory above where it began. A
    reader that re-copies what came before (`self.text += piece`) allocates the whole
    text again at every piece; one that keeps pieces allocates about the piece."""
    peaks = []
    tracemalloc.start()
    try:
        for piece in pieces:
            before, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            feed(piece)
            peaks.append(tracemalloc.get_traced_memory()[1] - before)
    finally:
        tracemalloc.stop()
    return peaks


def test_a_chat_choice_readers_work_per_chunk_stays_flat():
    """2,000 pieces of a reasoning model's streamed reply, through the reasoning parser,
    Hermes tool reading and the Responses output items: the memory each piece makes the
    readers allocate at the end is what it was at the start (the text is ~64 KB by then)."""
    from pagedserve.server.reasoning_parsers import get_reasoning_parser
    from pagedserve.server.responses import _Output
    from pagedserve.server.serving import ChoiceReader
    from pagedserve.server.tool_parsers import get_tool_parser

    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    reader = ChoiceReader(get_reasoning_parser("qwen3")(), get_tool_parser("hermes")(tools=tools))
    output = _Output()
    words = [f" word{i:04d} of the reply, say" for i in range(NUM_TOKENS)]  # 27-28 chars
    half = NUM_TOKENS // 2
    pieces = ["<think>", *words[:half], "</think>\n\n", *words[half:]]

    def feed(piece: str) -> None:
        output.add(reader.stream(piece, finished=False))
        output.events.clear()

    peaks = _allocation_peaks(feed, pieces)
    output.add(reader.stream("", finished=True))
    output.close()
    # Everything arrived, in two items: the reasoning, then the answer.
    reasoning, message = output.items
    assert reasoning["content"][0]["text"] == "".join(words[:half]).strip()
    assert message["content"][0]["text"] == "".join(words[half:]).strip()
    # Late pieces cost what early ones did: 200 pieces of each half, from the 10th on.
    for start, end in ((1, half + 1), (half + 2, len(pieces))):
        early, late = peaks[start + 10:start + 210], peaks[end - 200:end]
        assert sum(late) < 1.5 * sum(early) + 16384, (start, sum(early), sum(late))
