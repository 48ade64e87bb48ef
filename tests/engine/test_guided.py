"""Guided decoding (structured output) through the engine with the embedded SmolLM2: outputs
follow JSON schemas, regexes, choices and grammars; masked tokens have probability 0;
unguided neighbours are untouched; bad specs fail at add_request and leave the engine serving."""

import json
import re

import jsonschema
import pytest
import torch

from pagedserve.engine import LLM, GuidedDecodingParams, SamplingParams
from pagedserve.engine.outputs import RequestOutput

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

# Every schema below bounds its JSON text to < 64 ASCII characters (patterns, ranges,
# maxItems; compact whitespace), and a token is at least one character, so each guided
# output must end by its grammar (finish_reason "stop") within MAX_TOKENS.
MAX_TOKENS = 64
SCHEMAS = {
    "flat": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "pattern": "^[A-Za-z ]{1,12}$"},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "active": {"type": "boolean"},
        },
        "required": ["name", "age", "active"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "pattern": "^[A-Za-z]{1,10}$"},
            "location": {
                "type": "object",
                "properties": {
                    "lat": {"type": "integer", "minimum": -90, "maximum": 90},
                    "lon": {"type": "integer", "minimum": -180, "maximum": 180},
                },
                "required": ["lat", "lon"],
            },
        },
        "required": ["city", "location"],
    },
    "array": {
        "type": "object",
        "properties": {
            "primes": {
                "type": "array",
                "items": {"type": "integer", "minimum": 0, "maximum": 99},
                "minItems": 1,
                "maxItems": 4,
            },
        },
        "required": ["primes"],
    },
    "enum": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "size": {"type": "string", "enum": ["S", "M", "L"]},
        },
        "required": ["color", "size"],
    },
    "optional": {  # "note" may be left out; "id" and "ok" may not
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 999},
            "note": {"type": "string", "pattern": "^[a-z ]{0,10}$"},
            "ok": {"const": True},
        },
        "required": ["id", "ok"],
    },
}
QUESTIONS = {
    "flat": "Describe a person as JSON with name, age and active.",
    "nested": "Give a city and its location (lat, lon) as JSON.",
    "array": "List a few prime numbers as JSON.",
    "enum": "Pick a t-shirt color and size, as JSON.",
    "optional": "Give a ticket with an id as JSON.",
}
PHONE = r"\(\d{3}\) \d{3}-\d{4}"
CITIES = ["Paris", "London", "Berlin"]
SAMPLED = dict(temperature=1.0, seed=1234, n=4, max_tokens=MAX_TOKENS)
GREEDY = dict(temperature=0.0, max_tokens=MAX_TOKENS)
# Unguided requests that share the batch with the guided ones.
PLAIN = [
    ("The capital of France is", SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)),
    ("def fibonacci(n):", SamplingParams(temperature=1.0, seed=7, max_tokens=20, ignore_eos=True)),
]


@pytest.fixture(scope="module")
def llm():
    # The exact path: its tokens do not depend on the batch around a request, which the
    # neighbour test relies on (the quantized kernels' roundings do).
    return LLM(kv_cache_memory=256 << 20, quantization="none")


def chat(llm, question: str) -> dict:
    """A prompt dict with the chat template applied (what the server sends)."""
    text = llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    return {"prompt": text,
            "prompt_token_ids": llm.get_tokenizer()(text, add_special_tokens=False).input_ids}


def guided(**kwargs) -> GuidedDecodingParams:
    return GuidedDecodingParams(**kwargs)


def run(llm, requests: list[tuple[object, SamplingParams]]) -> list[RequestOutput]:
    outputs = llm.generate([p for p, _ in requests], [sp for _, sp in requests], use_tqdm=False)
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    kvm = engine.kv_cache_manager
    assert kvm.num_free_blocks == kvm.block_pool.num_blocks
    return outputs


@pytest.fixture(scope="module")
def mixed_batch(llm):
    """One batch holding every kind of guided request and the unguided PLAIN ones; the
    outputs keyed by a name."""
    named: list[tuple[str, object, SamplingParams]] = []
    for name, schema in SCHEMAS.items():
        prompt = chat(llm, QUESTIONS[name])
        named.append((f"{name}/greedy", prompt,
                      SamplingParams(**GREEDY, guided_decoding=guided(json=schema))))
        named.append((f"{name}/sampled", prompt,
                      SamplingParams(**SAMPLED, guided_decoding=guided(json=schema))))
    named += [
        ("json_object", chat(llm, "Give a JSON object with one key 'ok' set to true."),
         SamplingParams(**GREEDY, guided_decoding=guided(json_object=True))),
        ("regex", chat(llm, "Give me a US phone number."),
         SamplingParams(temperature=0.0, max_tokens=32, logprobs=20,
                        guided_decoding=guided(regex=PHONE))),
        ("choice", chat(llm, "What is the capital of France?"),
         SamplingParams(temperature=0.0, max_tokens=16, guided_decoding=guided(choice=CITIES))),
        # ignore_eos: the grammar still ends the request when it completes.
        ("choice/ignore_eos", chat(llm, "Name a European capital."),
         SamplingParams(temperature=1.0, seed=5, n=3, max_tokens=16, ignore_eos=True,
                        guided_decoding=guided(choice=CITIES))),
        ("grammar", chat(llm, "Answer yes or no: is the sky blue?"),
         SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=16,
                        guided_decoding=guided(grammar='root ::= ("yes" | "no") "!"?'))),
        ("length", chat(llm, QUESTIONS["flat"]),
         SamplingParams(temperature=0.0, max_tokens=5,
                        guided_decoding=guided(json=SCHEMAS["flat"]))),
    ]
    named += [(f"plain/{i}", prompt, sp) for i, (prompt, sp) in enumerate(PLAIN)]
    outputs = run(llm, [(p, sp) for _, p, sp in named])
    return {name: out for (name, _, _), out in zip(named, outputs, strict=True)}


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_outputs_parse_and_validate(mixed_batch, name, mode):
    completions = mixed_batch[f"{name}/{mode}"].outputs
    assert len(completions) == (4 if mode == "sampled" else 1)
    for c in completions:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), SCHEMAS[name])
    if mode == "sampled":  # four seeds, not four copies
        assert len({c.text for c in completions}) > 1


def test_json_object_regex_choice_and_grammar(mixed_batch):
    [obj] = mixed_batch["json_object"].outputs
    assert obj.finish_reason == "stop" and isinstance(json.loads(obj.text), dict)
    [phone] = mixed_batch["regex"].outputs
    assert phone.finish_reason == "stop" and re.fullmatch(PHONE, phone.text)
    [city] = mixed_batch["choice"].outputs
    assert city.finish_reason == "stop" and city.text in CITIES
    for c in mixed_batch["choice/ignore_eos"].outputs:
        assert c.finish_reason == "stop" and c.text in CITIES
    for c in mixed_batch["grammar"].outputs:
        assert c.finish_reason == "stop" and re.fullmatch(r"(yes|no)!?", c.text)


def test_max_tokens_before_the_grammar_completes_is_length(mixed_batch):
    [c] = mixed_batch["length"].outputs
    assert c.finish_reason == "length" and len(c.token_ids) == 5
    assert c.text.startswith('{"name": "')


def test_stop_token_ends_the_output_and_is_not_in_the_text(llm, mixed_batch):
    eos = llm.llm_engine.eos_token_ids
    for name in ("flat/greedy", "regex", "choice"):
        [c] = mixed_batch[name].outputs
        assert c.token_ids[-1] in eos
        assert c.text == llm.get_tokenizer().decode(c.token_ids[:-1])


def test_masked_tokens_have_zero_probability(llm, mixed_batch):
    """Replay the phone-number output with a fresh matcher: every token the grammar forbids
    at a step is absent from its top-20 or has logprob -inf, and the allowed ones carry
    all the probability (the logprobs describe the masked distribution)."""
    [c] = mixed_batch["regex"].outputs
    manager = llm.llm_engine.structured_output
    matcher = manager.new_matcher(manager.compile(guided(regex=PHONE)),
                                  llm.llm_engine.eos_token_ids)
    vocab = llm.llm_engine.hf_config.vocab_size
    bitmask = torch.zeros(1, (vocab + 31) // 32, dtype=torch.int32)
    for token, top in zip(c.token_ids, c.logprobs, strict=True):
        matcher.fill_next_token_bitmask(bitmask)
        allowed = set(unpack_bitmask(bitmask[0], vocab).nonzero().flatten().tolist())
        assert token in allowed
        assert len(top) >= 20
        for tid, lp in top.items():
            assert (tid in allowed) == (lp.logprob > float("-inf")), (tid, lp)
        if len(allowed) <= 20:  # all allowed tokens listed: their probabilities sum to 1
            total = sum(torch.tensor(lp.logprob).exp().item() for lp in top.values())
            assert total == pytest.approx(1.0, abs=1e-4)
        assert matcher.accept_token(token)
    assert matcher.is_terminated()


def unpack_bitmask(row: torch.Tensor, vocab: int) -> torch.Tensor:
    """Bool [vocab]: bit j of int32 word j // 32 set."""
    bits = (row.unsqueeze(1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:vocab].bool()


def test_bitmask_masks_exactly_the_guided_rows(llm):
    engine = llm.llm_engine
    manager = engine._get_structured_output()
    vocab = engine.hf_config.vocab_size

    compiled = manager.compile(guided(regex=PHONE))
    advanced = manager.new_matcher(compiled, engine.eos_token_ids)
    assert advanced.accept_string("(55")
    rows = [None, manager.new_matcher(compiled, engine.eos_token_ids), None, advanced]
    grammar_bitmask = manager.fill_bitmask(rows)
    assert grammar_bitmask.rows == [1, 3]
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0))
    masked = logits.clone()
    grammar_bitmask.apply(masked)
    assert torch.equal(masked[[0, 2]], logits[[0, 2]])
    tok = llm.get_tokenizer()
    for row, must_allow, must_forbid in ((1, "(", "5"), (3, "5", "(")):
        allowed = unpack_bitmask(grammar_bitmask.bitmask[row], vocab)
        assert torch.equal(masked[row][allowed], logits[row][allowed])
        assert torch.isneginf(masked[row][~allowed]).all()
        assert allowed[tok.convert_tokens_to_ids(must_allow)]
        assert not allowed[tok.convert_tokens_to_ids(must_forbid)]
    assert manager.fill_bitmask([None, None]) is None


def test_unguided_requests_are_untouched_by_guided_neighbours(llm, mixed_batch):
    alone = run(llm, PLAIN)
    for i, out in enumerate(alone):
        assert out.outputs[0].token_ids == mixed_batch[f"plain/{i}"].outputs[0].token_ids


@pytest.mark.parametrize("spec, message", [
    (dict(json={"type": "object", "properties": {"a": {"type": "nope"}}}), "json"),
    (dict(json='{"type": "strin"}'), "json"),
    (dict(regex="(ab"), "regex"),
    (dict(grammar="root ::= undefined_rule"), "grammar"),
])
def test_invalid_specs_raise_at_add_and_the_engine_keeps_serving(llm, spec, message):
    good = (chat(llm, "Pick a size."), SamplingParams(
        temperature=0.0, max_tokens=8, guided_decoding=guided(choice=["S", "M"])))
    bad = (chat(llm, "Anything."), SamplingParams(guided_decoding=guided(**spec)))
    with pytest.raises(ValueError, match=rf"invalid guided_decoding\.{message}: \S"):
        llm.generate([good[0], bad[0]], [good[1], bad[1]], use_tqdm=False)
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests() and not engine.scheduler.waiting
    [out] = run(llm, [good])  # run() also checks that every block is free
    assert out.outputs[0].text in ("S", "M")


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "exactly one of"),
    (dict(regex="a", choice=["a"]), "got regex, choice"),
    (dict(json="{not json"), "not valid JSON"),
    (dict(json=["a"]), "dict or its JSON text"),
    (dict(choice=[]), "non-empty list"),
    (dict(choice="abc"), "non-empty list"),
    (dict(regex=""), "non-empty string"),
])
def test_bad_guided_params_say_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GuidedDecodingParams(**kwargs)


def test_min_tokens_with_guided_decoding_is_rejected():
    with pytest.raises(ValueError, match="min_tokens cannot be combined with guided_decoding"):
        SamplingParams(min_tokens=2, guided_decoding=GuidedDecodingParams(regex="a+"))


def test_equal_specs_compile_once(llm):
    manager = llm.llm_engine._get_structured_output()
    schema = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "string"}}}
    reordered = {"properties": {"y": {"type": "string"}, "x": {"type": "integer"}},
                 "type": "object"}
    before = manager.num_compilations
    first = manager.compile(guided(json=schema))
    assert manager.num_compilations == before + 1
    assert manager.compile(guided(json=reordered)) is first
    assert manager.compile(guided(json=json.dumps(schema, indent=2))) is first
    assert manager.num_compilations == before + 1
    # Whitespace changes the grammar, so it is part of the key.
    assert manager.compile(guided(json=schema, any_whitespace=True)) is not first
    assert manager.num_compilations == before + 2


def test_abort_releases_matchers_and_blocks(llm):
    engine = llm.llm_engine
    engine.add_request("abort-me", chat(llm, QUESTIONS["flat"]), SamplingParams(
        n=2, seed=0, max_tokens=MAX_TOKENS, guided_decoding=guided(json=SCHEMAS["flat"])))
    children = [engine._sequences[f"abort-me#{i}"][0] for i in range(2)]
    assert all(c.grammar is not None for c in children)
    for _ in range(3):
        engine.step()
    assert all(c.num_output_tokens > 0 for c in children)
    [out] = engine.abort_request("abort-me")
    assert all(c.finish_reason == "abort" for c in out.outputs)
    assert all(c.grammar is None for c in children)
    kvm = engine.kv_cache_manager
    assert not engine.has_unfinished_requests()
    assert kvm.num_free_blocks == kvm.block_pool.num_blocks


def test_preemption_and_chunked_prefill_do_not_disturb_the_grammar(llm, mixed_batch):
    """A cache too small for the batch (so requests are preempted and recomputed) and a
    16-token budget (so prompts are prefilled in chunks) give the same greedy outputs."""
    small = LLM(num_gpu_blocks_override=12, block_size=16, max_model_len=160,
                max_num_batched_tokens=16, quantization="none")
    names = ["flat", "nested", "array", "optional"]
    requests = [(chat(llm, QUESTIONS[n]),
                 SamplingParams(**GREEDY, guided_decoding=guided(json=SCHEMAS[n])))
                for n in names]
    outputs = run(small, requests)
    assert small.llm_engine.scheduler.num_preemptions > 0
    for name, out in zip(names, outputs, strict=True):
        assert out.outputs[0].token_ids == mixed_batch[f"{name}/greedy"].outputs[0].token_ids


JOKE = {"type": "object", "properties": {"setup": {"type": "string"},
                                         "punchline": {"type": "string"}},
        "required": ["setup", "punchline"]}


def test_forced_text_is_spelled_as_the_tokenizer_spells_it(llm):
    """Where the schema forces a key, the row allows only the tokenizer's own first token
    of it (`setup`), never its pieces (`s`, `set`, ...), which the grammar alone permits and
    SmolLM2 then derails after. Where the forced text may merge with what follows (the
    ` "` before a free string), the choice stays open."""
    engine = llm.llm_engine
    manager = engine._get_structured_output()
    vocab = engine.hf_config.vocab_size
    tok = llm.get_tokenizer()
    compiled = manager.compile(guided(json=JOKE))

    def allowed_after(text: str, canonical: bool) -> torch.Tensor:
        matcher = manager.new_matcher(compiled, engine.eos_token_ids)
        for token in tok.encode(text, add_special_tokens=False):
            assert matcher.accept_token(token)
        manager.canonical_forced_tokens = canonical
        try:
            return unpack_bitmask(manager.fill_bitmask([matcher]).bitmask[0], vocab)
        finally:
            manager.canonical_forced_tokens = True

    setup = tok.convert_tokens_to_ids("setup")
    pieces = [tok.convert_tokens_to_ids(t) for t in ("s", "set")]
    free = allowed_after('{"', canonical=False)
    assert free[setup] and all(free[p] for p in pieces)  # the grammar alone allows pieces
    forced = allowed_after('{"', canonical=True)
    assert forced.nonzero().flatten().tolist() == [setup]
    assert allowed_after('{"setup":', canonical=True).sum() > 1  # ` "` may merge onwards


def test_an_integer_without_bounds_ends_within_int64s_digits(llm):
    """Pushed to write 1s for ever (logit_bias), the model must end a number after 19
    digits: an integer the schema leaves unbounded gets int64's bounds (a small model can
    otherwise write digits until max_tokens); bounds the schema gives are its own."""
    one = llm.get_tokenizer().convert_tokens_to_ids("1")
    schema = {"type": "object", "required": ["n", "m"], "properties": {
        "n": {"type": "integer"}, "m": {"type": "integer", "maximum": 99}}}
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logit_bias={one: 100.0},
                            guided_decoding=guided(json=schema))
    (out,) = run(llm, [(chat(llm, "Two numbers, please."), params)])
    assert json.loads(out.outputs[0].text) == {"n": int("1" * 19), "m": 11}
    assert out.outputs[0].finish_reason == "stop"


@pytest.fixture(scope="module")
def thinking_llm(tmp_path_factory):
    """A tiny random model whose tokenizer (the embedded one) has <think> and </think> as
    single tokens (added, not special: kept in the text, as Qwen3's), on an engine told they
    are its reasoning tags."""
    from tests.tiny_models import build_thinking_tokenizer, build_tiny_model

    path = tmp_path_factory.mktemp("thinking")
    tokenizer, start, end = build_thinking_tokenizer(path / "tokenizer")
    model = build_tiny_model(path / "model", "llama", vocab_size=end + 1)
    llm = LLM(model=str(model), tokenizer=str(tokenizer), kv_cache_memory=16 << 20,
              reasoning_tags=("<think>", "</think>"))
    return llm, start, end


def test_with_reasoning_tags_the_grammar_holds_only_after_the_thinking(thinking_llm):
    """The prompt opened the thinking: output is free until </think> (here pushed to come
    first), then the grammar's. The prompt closed it: the grammar holds from the first token
    (</think> is masked however much it is wanted). No thinking yet: the first token may
    open it, or be the grammar's."""
    llm, start, end = thinking_llm
    tokenizer = llm.get_tokenizer()
    yes_no = guided(choice=["yes", "no"])

    def first_tokens(prompt: str, bias: dict[int, float], max_tokens: int = 10):
        params = SamplingParams(temperature=0, max_tokens=max_tokens, logit_bias=bias,
                                guided_decoding=yes_no)
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        (out,) = run(llm, [({"prompt_token_ids": ids}, params)])
        return out.outputs[0]

    opened = first_tokens("Is it? <think>", {end: 100.0})
    assert opened.token_ids[0] == end and opened.finish_reason == "stop"
    assert opened.text in ("</think>yes", "</think>no")
    closed = first_tokens("Is it? <think>hmm</think>", {end: 100.0})
    assert end not in closed.token_ids and closed.text in ("yes", "no")
    assert first_tokens("Is it?", {start: 100.0}, max_tokens=1).token_ids == [start]
    assert first_tokens("Is it?", {}).text in ("yes", "no")  # it need not think


class _FakeMatcher:
    """A grammar that allows only token 5, then is done; records what it is fed."""

    def __init__(self):
        self.accepted = []

    def fill_next_token_bitmask(self, bitmask, row):
        bitmask[row].zero_()
        bitmask[row, 0] = 1 << 5
        return True

    def accept_token(self, token_id):
        self.accepted.append(token_id)
        return token_id == 5

    def is_terminated(self):
        return bool(self.accepted)

    def find_jump_forward_string(self):
        return "forced"

    def find_jump_forward_tokens(self):
        return [5]


def test_thinking_first_frees_the_thinking_and_then_holds_the_grammar():
    from pagedserve.engine.structured_output import ThinkingFirst, thinking_state

    start, end = 63, 62  # bit 31 of word 1 for the start tag: the sign bit
    assert thinking_state([1, start, 2], start, end) == "thinking"
    assert thinking_state([1, start, 2, end, 3], start, end) == "answer"  # just closed
    assert thinking_state([1, start, 2, end] + [3] * 6, start, end) == "open"  # an old turn's
    assert thinking_state([1, 2], start, end) == "open"
    bitmask = torch.zeros(1, 2, dtype=torch.int32)

    def allowed():
        return [t for t in range(64) if (int(bitmask[0, t >> 5]) >> (t & 31)) & 1]

    gate = ThinkingFirst(_FakeMatcher(), start, end, [1, 2])  # may open, or answer
    assert gate.fill_next_token_bitmask(bitmask, 0) and allowed() == [5, start]
    assert gate.find_jump_forward_string() == "" and gate.find_jump_forward_tokens() == []
    assert gate.accept_token(start) and not gate.is_terminated()
    assert not gate.fill_next_token_bitmask(bitmask, 0)  # thinking: every token
    for token in (7, start, 8):  # anything goes, another <think> too
        assert gate.accept_token(token)
    assert gate.accept_token(end) and gate.matcher.accepted == []
    assert gate.fill_next_token_bitmask(bitmask, 0) and allowed() == [5]  # no <think> now
    assert gate.find_jump_forward_tokens() == [5]
    assert not gate.accept_token(start)  # the grammar's to refuse
    answering = ThinkingFirst(_FakeMatcher(), start, end, [start, end])
    assert answering.accept_token(5) and answering.is_terminated()
    assert ThinkingFirst(_FakeMatcher(), start, end, [1, 2]).accept_token(5)  # answered


def test_bound_integers_bounds_only_unbounded_integers_and_only_where_it_narrows():
    from pagedserve.engine.structured_output import bound_integers

    lo, hi = -(2**63), 2**63 - 1
    schema = {
        "type": "object",
        "properties": {
            "default": {"type": "integer"},  # a property named like a data keyword
            "n": {"type": "integer", "minimum": 0},
            "x": {"type": ["integer", "number"]},  # numbers must not be capped
            "y": {"type": ["integer", "null"], "default": {"type": "integer"}},
            "ref": {"$ref": "#/$defs/count"},
        },
        "$defs": {"count": {"type": "integer", "exclusiveMaximum": 10}},
        "not": {"type": "integer"},
        "enum": [{"type": "integer"}],
    }
    out = bound_integers(schema)
    props = out["properties"]
    assert props["default"] == {"type": "integer", "minimum": lo, "maximum": hi}
    assert props["n"] == {"type": "integer", "minimum": 0, "maximum": hi}
    assert props["x"] == {"type": ["integer", "number"]}
    assert props["y"] == {"type": ["integer", "null"], "default": {"type": "integer"},
                          "minimum": lo, "maximum": hi}
    assert out["$defs"]["count"] == {"type": "integer", "exclusiveMaximum": 10, "minimum": lo}
    assert out["not"] == {"type": "integer"} and out["enum"] == [{"type": "integer"}]
    assert schema["properties"]["default"] == {"type": "integer"}  # the input is untouched
