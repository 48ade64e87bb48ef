"""OpenAI API request/response shapes (pydantic v2), with vLLM's extra sampling fields.

Requests ignore fields they do not know (OpenAI SDKs send new ones before we learn them);
ranges are checked here so a bad value is a 400 that names the field."""

from __future__ import annotations

import time
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from pagedserve.engine.sampling_params import MAX_LOGPROBS


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


def first_invalid_text(value: Any, path: str = "") -> tuple[str, int] | None:
    """(field path, character index) of the first string in `value` (a model, or lists and
    dicts of them, keys included) that is not valid Unicode: JSON's \\ud800-style escapes
    can spell lone surrogates, which no tokenizer takes."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return path, exc.start
        return None
    items = _items(value)
    if items is None:
        return None
    for key, item in items:
        # The path names keys as the client wrote them, escaped: it goes into the error.
        shown = key.encode("utf-8", "backslashreplace").decode() if isinstance(key, str) else key
        inner = f"{path}.{shown}" if path else str(shown)
        found = (isinstance(key, str) and first_invalid_text(key, inner)
                 or first_invalid_text(item, inner))
        if found:
            return found
    return None


def _items(value: Any):
    """(key, item) pairs under a model (by wire name, extra fields too), dict or list."""
    if isinstance(value, BaseModel):
        fields = [(info.alias or name, getattr(value, name))
                  for name, info in type(value).model_fields.items()]
        return fields + list((value.model_extra or {}).items())
    if isinstance(value, dict):
        return value.items()
    if isinstance(value, list | tuple):
        return enumerate(value)
    return None


def text_chars(value: Any) -> int:
    """How many characters of text `value` (a model, or lists and dicts of them) holds."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(text_chars(k) + text_chars(v) for k, v in value.items())
    items = _items(value)
    return 0 if items is None else sum(text_chars(v) for _, v in items)


class RequestModel(OpenAIBaseModel):
    """A request body: every text in it must be valid Unicode (a 400 naming the field)."""

    @model_validator(mode="after")
    def _valid_unicode(self) -> RequestModel:
        found = first_invalid_text(self)
        if found is not None:
            raise PydanticCustomError(
                "invalid_unicode",
                "not valid Unicode text (a lone surrogate at character {index})",
                {"field": found[0], "index": found[1]})
        return self


# ---- errors --------------------------------------------------------------------------
class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo


# ---- structured output ---------------------------------------------------------------
class JsonSchemaFormat(OpenAIBaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = "response"
    description: str | None = None
    # `schema` would shadow a BaseModel attribute; the wire name is still "schema".
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIBaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None
                                           or self.json_schema.json_schema is None):
            raise ValueError('type "json_schema" needs json_schema.schema (a JSON schema)')
        return self


class StructuredOutputsParams(OpenAIBaseModel):
    """vLLM's `structured_outputs` (>= 0.12, where the guided_* fields went): one of json,
    regex, choice, grammar, json_object. Other keys set (whitespace_pattern, structural_tag)
    are a 400 naming them rather than a constraint silently dropped."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    # `json` would shadow a BaseModel attribute; the wire name is still "json".
    json_schema: str | dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool | None = None  # vLLM's default (None): any whitespace
    disable_fallback: bool = False  # one backend here: there is nothing to fall back to
    disable_additional_properties: Literal[False] = False

    @model_validator(mode="before")
    @classmethod
    def _nulls_ask_for_nothing(cls, data: Any) -> Any:
        # {"whitespace_pattern": null} is what a client that leaves it alone may send.
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


# vLLM's (and SGLang's) request extensions this server does not implement, with the values
# that ask for nothing (what a client that leaves them alone may still send; None always
# does). Any other value is a 400 naming the field: ignoring it would change the output
# without a word. (OpenAI fields that change nothing the model writes, such as store,
# metadata or service_tier, are accepted and ignored: README, "What is ignored".)
UNSUPPORTED_EXTENSIONS: dict[str, tuple[Any, ...]] = {
    "priority": (0,), "use_beam_search": (False,), "length_penalty": (1, 1.0),
    "bad_words": ([],), "allowed_token_ids": (), "truncate_prompt_tokens": (),
    "prompt_logprobs": (), "logits_processors": (), "spaces_between_special_tokens": (True,),
    "return_tokens_as_token_ids": (False,), "return_token_ids": (False,), "cache_salt": (),
    "kv_transfer_params": (), "vllm_xargs": (), "mm_processor_kwargs": (), "documents": (),
    "chat_template": (), "continue_final_message": (False,), "structural_tag": (),
    "guided_whitespace_pattern": (), "thinking_token_budget": (),
    "lora_request": (), "lora_path": (), "regex": (), "ebnf": (), "json_schema": (),
    "functions": (), "function_call": (),  # OpenAI's, deprecated for tools
}
_UNSUPPORTED_HINTS = {
    "priority": "this server schedules first come, first served",
    "functions": "send tools instead", "function_call": "send tool_choice instead",
    "chat_template": "start the server with --chat-template",
    "regex": "send structured_outputs.regex or guided_regex",
    "ebnf": "send structured_outputs.grammar or guided_grammar",
    "json_schema": "send response_format or structured_outputs.json",
}


def refuse_unsupported(data: Any, unsupported: dict[str, tuple[Any, ...]]) -> Any:
    """A before-validator: a field in `unsupported` set to anything but one of its neutral
    values (or null, or empty) is an "unsupported_field" error naming it."""
    if isinstance(data, dict):
        for name, neutral in unsupported.items():
            value = data.get(name)
            empty = isinstance(value, list | dict | str) and not value  # asks for nothing
            if value is not None and not empty and not any(
                    value == v and type(value) is type(v) for v in neutral):
                hint = _UNSUPPORTED_HINTS.get(name, "leave it out")
                raise PydanticCustomError(
                    "unsupported_field", "not supported by this server (got {value}); {hint}",
                    {"field": name, "value": repr(value)[:100], "hint": hint})
    return data


# ---- shared request fields -----------------------------------------------------------
class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class SamplingRequest(RequestModel):
    """Fields common to chat and text completions, under OpenAI's and vLLM's names."""

    model: str | None = None  # None: the first served model name
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0.0, le=100.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM extras
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Structured output: OpenAI's response_format, or one of vLLM's guided_* fields.
    response_format: ResponseFormat | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputsParams | None = None

    _unsupported: ClassVar[dict[str, tuple[Any, ...]]] = UNSUPPORTED_EXTENSIONS

    @model_validator(mode="before")
    @classmethod
    def _no_unsupported_extensions(cls, data: Any) -> Any:
        return refuse_unsupported(data, cls._unsupported)


# ---- tools ---------------------------------------------------------------------------
class FunctionDefinition(OpenAIBaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: takes no arguments
    strict: bool | None = None


class ChatCompletionTool(OpenAIBaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(OpenAIBaseModel):
    name: str


class NamedToolChoice(OpenAIBaseModel):
    type: Literal["function"] = "function"
    function: FunctionName


class FunctionCall(OpenAIBaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(OpenAIBaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


# ---- chat completions ----------------------------------------------------------------
class TextContentPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIBaseModel):
    model_config = ConfigDict(extra="allow")  # name and the like reach the template

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool result: the call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    tools: list[ChatCompletionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # Reasoning models: passed to the chat template (Qwen3 reads enable_thinking, gpt-oss
    # style templates reasoning_effort); include_reasoning false drops reasoning_content.
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    include_reasoning: bool = True

    _unsupported: ClassVar[dict[str, tuple[Any, ...]]] = {**UNSUPPORTED_EXTENSIONS,
                                                          "echo": (False,)}


class TopLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(OpenAIBaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(OpenAIBaseModel):
    role: str = "assistant"
    content: str | None
    # With --reasoning-parser: the model's thinking (vLLM's two names for it).
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(OpenAIBaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatCompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatStreamChoice(OpenAIBaseModel):
    index: int
    # {"role": ...} first, then {"content": ...} and/or {"tool_calls": [...]}; {} on the last
    delta: dict[str, Any]
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


# ---- text completions ----------------------------------------------------------------
class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


class CompletionLogprobs(OpenAIBaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# ---- models --------------------------------------------------------------------------
class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagedserve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def sampling_kwargs(request: SamplingRequest) -> dict[str, Any]:
    """The SamplingParams fields a request sets (None: keep SamplingParams' default)."""
    kwargs: dict[str, Any] = dict(
        n=request.n, seed=request.seed, stop=request.stop,
        stop_token_ids=request.stop_token_ids, ignore_eos=request.ignore_eos,
        min_tokens=request.min_tokens,
        include_stop_str_in_output=request.include_stop_str_in_output,
        skip_special_tokens=request.skip_special_tokens,
    )
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k",
                 "min_p", "repetition_penalty"):
        value = getattr(request, name)
        if value is not None:
            kwargs[name] = value
    return kwargs


# ---- embeddings ----------------------------------------------------------------------
class EmbeddingRequest(RequestModel):
    # list[int] before list[str] would not matter: pydantic's smart union takes exact matches.
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None  # None: the served embedding model
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    # vLLM's: keep each input's first k tokens (special tokens included); -1: the model's
    # max_seq_length. None: the server's --embedding-overflow decides.
    truncate_prompt_tokens: int | None = Field(None, ge=-1)


class EmbeddingData(OpenAIBaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32


class EmbeddingUsage(OpenAIBaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


# ---- tokenizer endpoints (vLLM's shapes) ---------------------------------------------
class TokenizeRequest(RequestModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None  # tokenize a chat as the template renders it
    tools: list[ChatCompletionTool] | None = None  # ... with these tools in its prompt
    add_special_tokens: bool = True  # for prompt (a rendered chat already has its own)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None  # for messages


class TokenizeResponse(OpenAIBaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str
