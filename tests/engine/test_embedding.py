"""EmbeddingEngine against a reference computed here with transformers directly (the
sentence-transformers recipe for all-MiniLM-L6-v2: mean pooling, then L2 normalisation)."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from pagedserve.engine.embedding import (
    AsyncEmbeddingEngine,
    EmbeddingEngine,
    InputTooLongError,
    SentenceTransformerConfig,
    pool,
)

TEXTS = [
    "The cat sat on the mat.",
    "Paged attention stores the KV cache in fixed-size blocks.",
    "hi",
    "A considerably longer sentence, so that padding in a batch matters for the shorter "
    "ones: it goes on for a while about nothing in particular, just to be long.",
]


@pytest.fixture(scope="module")
def engine() -> EmbeddingEngine:
    return EmbeddingEngine(max_batch_size=64)


def reference(model_dir, texts: list[str]) -> torch.Tensor:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True,
                                      dtype=torch.float32).eval()
    rows = []
    with torch.inference_mode():
        for text in texts:  # one at a time: no padding in the reference at all
            enc = tokenizer(text, return_tensors="pt")
            hidden = model(**enc).last_hidden_state[0]  # [seq, dim]
            rows.append(torch.nn.functional.normalize(hidden.mean(dim=0), dim=0))
    return torch.stack(rows)


def test_config_read_from_the_checkpoint(engine):
    assert engine.st_config == SentenceTransformerConfig("mean", True, 256)
    assert engine.name == "all-MiniLM-L6-v2"
    assert engine.dim == 384 and engine.max_seq_length == 256


def test_matches_transformers_reference(engine):
    vectors, counts = engine.embed(TEXTS)
    assert vectors.shape == (len(TEXTS), 384) and vectors.dtype == torch.float32
    expected = reference(engine.model_dir, TEXTS)
    cos = torch.nn.functional.cosine_similarity(vectors, expected, dim=-1)
    assert cos.min() > 0.9999, cos
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(len(TEXTS)))
    assert counts == [len(engine.tokenizer(t).input_ids) for t in TEXTS]
    assert counts[2] == 3  # [CLS] hi [SEP]


def test_batching_and_padding_do_not_change_results(engine):
    together, _ = engine.embed(TEXTS)
    alone = torch.cat([engine.embed([t])[0] for t in TEXTS])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    engine.max_batch_size = 3  # 4 texts: batches of 3 and 1, padded differently
    try:
        split, _ = engine.embed(TEXTS)
    finally:
        engine.max_batch_size = 64
    torch.testing.assert_close(split, together, atol=1e-5, rtol=1e-5)
    repeated, _ = engine.embed([TEXTS[2]] * 3 + [TEXTS[3]])
    torch.testing.assert_close(repeated[:3], together[2].expand(3, -1), atol=1e-5, rtol=1e-5)


def test_token_ids_equal_text(engine):
    ids = [engine.tokenizer(t, add_special_tokens=False).input_ids for t in TEXTS]
    from_ids, id_counts = engine.embed(ids)
    from_text, text_counts = engine.embed(TEXTS)
    torch.testing.assert_close(from_ids, from_text, atol=1e-6, rtol=1e-6)
    assert id_counts == text_counts == [len(x) + 2 for x in ids]


def test_bad_inputs_raise_with_numbers(engine):
    with pytest.raises(InputTooLongError, match=r"maximum context length is 256 tokens.*"
                                                r"input\[1\] has 302 tokens"):
        engine.embed(["fine", "word " * 300])
    with pytest.raises(InputTooLongError, match="input\\[0\\] has 257 tokens"):
        engine.embed([[1000] * 255])  # + [CLS] and [SEP]
    engine.embed([[1000] * 254])  # exactly at the limit is fine
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 30522\)"):
        engine.embed([[5, 30522]])
    with pytest.raises(ValueError, match="must not be empty"):
        engine.embed([])
    with pytest.raises(ValueError, match="list of strings or a list of token-id lists"):
        engine.embed(["text", [1, 2]])


def test_pool_modes():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 6.0], [100.0, 100.0]]])  # [1, 3, 2]; last is pad
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(pool(hidden, mask, "mean"), torch.tensor([[2.0, 4.0]]))
    torch.testing.assert_close(pool(hidden, mask, "max"), torch.tensor([[3.0, 6.0]]))
    torch.testing.assert_close(pool(hidden, mask, "cls"), torch.tensor([[1.0, 2.0]]))
    torch.testing.assert_close(pool(hidden, mask, "lasttoken"), torch.tensor([[3.0, 6.0]]))
    torch.testing.assert_close(pool(hidden, mask, "mean_sqrt_len"),
                               torch.tensor([[4.0, 8.0]]) / 2 ** 0.5)


class _GatedEngine:
    """Blocks in embed() until the event loop opens the gate: if embed() ran on the loop's
    own thread, the loop could never open it and the wait would time out."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.threads: list[str] = []

    def embed(self, inputs, truncate_to=None, keep="first"):
        self.threads.append(threading.current_thread().name)
        if not self.gate.wait(timeout=10):
            raise AssertionError("embed() blocked the event loop")
        return inputs


def test_async_wrapper_runs_off_the_event_loop():
    gated = _GatedEngine()
    async_engine = AsyncEmbeddingEngine(gated)

    async def main():
        first = asyncio.ensure_future(async_engine.embed(["a"]))
        second = asyncio.ensure_future(async_engine.embed(["b"]))
        await asyncio.sleep(0)  # both submitted; the worker is now waiting on the gate
        gated.gate.set()
        return await first, await second

    try:
        assert asyncio.run(main()) == (["a"], ["b"])
    finally:
        async_engine.shutdown()
    assert len(gated.threads) == 2
    assert all(name.startswith("pagedserve-embed") for name in gated.threads)


def test_async_wrapper_gives_the_engine_results(engine):
    async_engine = AsyncEmbeddingEngine(engine)

    async def main():
        return await asyncio.gather(*(async_engine.embed([t]) for t in TEXTS))

    try:
        results = asyncio.run(main())
    finally:
        async_engine.shutdown()
    expected, counts = engine.embed(TEXTS)
    torch.testing.assert_close(torch.cat([v for v, _ in results]), expected,
                               atol=1e-5, rtol=1e-5)
    assert [c for _, (c,) in results] == counts
