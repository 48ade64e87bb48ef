"""OpenAI chat and text completions over AsyncEngine: request -> prompt + SamplingParams ->
engine outputs -> OpenAI JSON or SSE chunks. Knows no HTTP routing (see server/app.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi.responses import JSONResponse, StreamingResponse

from pagedserve.engine.async_engine import (
    AsyncEngine,
    EngineDeadError,
    EngineOverloadedError,
    EngineShutDownError,
    RequestFailedError,
)
from pagedserve.engine.embedding import AsyncEmbeddingEngine, InputTooLongError
from pagedserve.engine.outputs import CompletionOutput, DeltaAccumulator, Logprob, RequestOutput
from pagedserve.engine.sampling_params import RequestOutputKind, SamplingParams
from pagedserve.engine.structured_output import thinking_state
from pagedserve.engine.tokenization import max_text_chars
from pagedserve.server.errors import APIError, error_body, internal_error
from pagedserve.server.guided import guided_decoding
from pagedserve.server.metrics import ServerMetrics
from pagedserve.server.protocol import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChatResponseMessage,
    ChatStreamChoice,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    FunctionCall,
    SamplingRequest,
    TokenizeRequest,
    TokenizeResponse,
    ToolCall,
    TopLogprob,
    UsageInfo,
    sampling_kwargs,
    text_chars,
)
from pagedserve.server.reasoning_parsers import ReasoningParser, get_reasoning_parser
from pagedserve.server.tool_parsers import (
    StreamDelta,
    ToolCallStream,
    detect_tool_parser,
    get_tool_parser,
)
from pagedserve.server.tools import ToolPlan, conversation, template_knows_tools, tool_dicts

logger = logging.getLogger(__name__)

# JSON has no -inf; OpenAI and vLLM clamp to this.
_MIN_LOGPROB = -9999.0


class ChoiceStream:
    """What one streamed choice has sent, from the engine's delta outputs (each holds only
    new text, tokens and logprobs, so a chunk costs O(new) however long the output)."""

    __slots__ = ("num_generated", "finished")

    def __init__(self) -> None:
        self.num_generated = 0
        self.finished = False

    def advance(self, out: CompletionOutput, want_logprobs: bool) -> bool:
        """Count `out`'s new tokens; True when it holds something to send now (text, the
        finish, or logprobs of tokens whose text is still held back)."""
        if self.finished:
            return False
        self.num_generated += len(out.token_ids)
        self.finished = out.finish_reason is not None
        return bool(out.text) or self.finished or (want_logprobs and bool(out.token_ids))


def engine_error(exc: BaseException) -> APIError | None:
    """The APIError for an exception out of AsyncEngine.generate, or None if it is a bug."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineOverloadedError):
        return APIError(str(exc), 503, "service_unavailable_error", code="engine_overloaded")
    if isinstance(exc, EngineShutDownError):
        return APIError(f"The server is shutting down: {exc}", 503,
                        "service_unavailable_error", code="server_shutting_down")
    if isinstance(exc, EngineDeadError):
        return APIError(str(exc), 500, "server_error", code="engine_dead")
    if isinstance(exc, RequestFailedError):
        return APIError(str(exc), 500, "server_error", code="request_failed")
    if isinstance(exc, ValueError | TypeError):  # bad input, raised by add_request
        match = re.search(r"SamplingParams\.(\w+)", str(exc))
        return APIError(str(exc), param=match.group(1) if match else None)
    return None


async def merge_async_iterators(
    *iterators: AsyncIterator[RequestOutput],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several engine streams as (stream index, output). Closing this closes
    (and so aborts) all of them, also from inside a cancelled task (client disconnect)."""
    if len(iterators) == 1:
        try:
            async for item in iterators[0]:
                yield 0, item
        finally:
            with anyio.CancelScope(shield=True):
                await iterators[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, it: AsyncIterator[RequestOutput]) -> None:
        try:
            async for item in it:
                queue.put_nowait((i, item))
        except Exception as exc:
            queue.put_nowait((i, exc))
        finally:
            await it.aclose()
            queue.put_nowait((i, done))

    tasks = [asyncio.create_task(pump(i, it)) for i, it in enumerate(iterators)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


def _sse(payload: str) -> str:
    return f"data: {payload}\n\n"


def _clamp(logprob: float) -> float:
    return max(float(logprob), _MIN_LOGPROB)


def _finish_reason(engine_reason: str | None, reader: ToolCallStream | None) -> str | None:
    """A choice that ended by itself after calling tools finished with "tool_calls" (as
    does one cut short where it began to repeat its calls)."""
    if reader is not None and reader.calls and (
            engine_reason == "stop" or getattr(reader, "repeating", False)):
        return "tool_calls"
    return engine_reason


# What the chat template's other arguments are; chat_template_kwargs may not set them.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "tokenize",
    "add_generation_prompt", "continue_final_message", "return_dict", "return_tensors",
    "return_assistant_tokens_mask", "padding", "truncation", "max_length", "tokenizer_kwargs"})


def chat_template_kwargs(request: ChatCompletionRequest) -> dict[str, Any]:
    """The template's extra variables: chat_template_kwargs, and reasoning_effort (which
    templates of reasoning models read)."""
    kwargs = dict(request.chat_template_kwargs or {})
    if request.reasoning_effort is not None:
        kwargs.setdefault("reasoning_effort", request.reasoning_effort)
    return kwargs


@dataclass(slots=True)
class ChatRun:
    """A chat request submitted to the engine: its outputs come through `merged`."""

    request_id: str
    model: str  # the served name it asked for
    merged: AsyncIterator[tuple[int, RequestOutput]]
    guide_field: str | None  # the field whose constraint it carries, to name in errors
    new_reader: Callable[[], ChoiceReader]  # one per choice
    num_prompt_tokens: int
    top_n: int  # top_logprobs
    num_choices: int = 1  # n


class ChoiceReader:
    """One chat choice's text -> reasoning, content and tool calls: the reasoning parser
    (if the server has one) takes the thinking out first, then the tool reader (if the
    request has tools) reads calls in what is left. Streamed or whole, the same split."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolCallStream | None,
                 include_reasoning: bool = True, think_end_id: int | None = None) -> None:
        """`think_end_id`: the token that closes the thinking, to count reasoning tokens by
        (None: not one token; they are not counted)."""
        self.reasoning, self.tools = reasoning, tools
        self.include_reasoning = include_reasoning
        self._think_end_id = think_end_id
        self._thinking_tokens = 0
        self._thought_ended = think_end_id is None

    def count(self, token_ids: list[int]) -> None:
        """Note the choice's next generated token ids (all of them, or the next delta)."""
        if self._thought_ended or self.reasoning is None:
            return
        if self._think_end_id in token_ids:
            self._thinking_tokens += token_ids.index(self._think_end_id) + 1
            self._thought_ended = True
        else:
            self._thinking_tokens += len(token_ids)

    @property
    def reasoning_tokens(self) -> int:
        """Generated tokens of the thinking, its closing tag included (vLLM's count); 0
        when the choice did not think, or its tag is not one token."""
        if self.reasoning is None or not self.reasoning.reasoning or self._think_end_id is None:
            return 0
        return self._thinking_tokens

    @property
    def done(self) -> bool:
        """The reply is over before the engine says so (it began repeating its calls):
        what comes after is dropped, and the request can stop."""
        return getattr(self.tools, "repeating", False)

    def parse(self, text: str) -> tuple[str | None, str | None, list]:
        """(reasoning or None, content or None, tool calls) of the whole text."""
        reasoning = None
        if self.reasoning is not None:
            reasoning, text = self.reasoning.parse(text)
        if not self.include_reasoning:
            reasoning = None
        if self.tools is None:  # with a reasoning parser, no answer is content None
            return reasoning, text if self.reasoning is None or text else None, []
        content, calls = self.tools.parse(text)
        return reasoning, content, calls

    def stream(self, text: str, finished: bool) -> list[dict[str, Any]]:
        """The `delta`s for the next piece of text (the last piece when `finished`)."""
        reasoning = ""
        if self.reasoning is not None:
            reasoning, text = self.reasoning.feed(text)
            if finished:
                more_reasoning, more_text = self.reasoning.finish()
                reasoning, text = reasoning + more_reasoning, text + more_text
        deltas = ([{"reasoning_content": reasoning, "reasoning": reasoning}]
                  if reasoning and self.include_reasoning else [])
        if self.tools is None:
            return deltas + ([{"content": text}] if text else [])
        read = self.tools.feed(text)
        if finished:
            read.extend(self.tools.finish())
        return deltas + _split_delta(read)


def _split_delta(delta: StreamDelta) -> list[dict[str, Any]]:
    """`delta` as chat chunk deltas: content first; a call's opening entry and its arguments
    go in separate chunks, as OpenAI streams them (one entry per call index per chunk)."""
    deltas: list[dict[str, Any]] = [{"content": delta.content}] if delta.content else []
    for entry in delta.tool_calls:
        current = deltas[-1].setdefault("tool_calls", []) if deltas else None
        if current is None or any(e["index"] == entry["index"] for e in current):
            deltas.append({"tool_calls": [entry]})
        else:
            current.append(entry)
    return deltas


async def _naming_guide(work, guide_field: str | None):
    """Await `work`; a bad guide the engine rejects (say, a schema it cannot compile) is a
    400 naming the request field that gave it."""
    try:
        return await work
    except APIError as exc:
        # The engine says "invalid guided_decoding.<kind>: <why>".
        if guide_field is not None and exc.param is None and "guided_decoding" in exc.message:
            exc.param = guide_field
            exc.message = f"{guide_field}: {exc.message}"
        raise


class OpenAIServing:
    """Turns validated OpenAI requests into engine requests and engine outputs back."""

    def __init__(self, async_engine: AsyncEngine, served_model_names: list[str],
                 chat_template: str | None = None, metrics: ServerMetrics | None = None,
                 tool_parser: str = "auto", reasoning_parser: str | None = None) -> None:
        """`tool_parser`: the model's tool-call format (tool_choice "auto");
        `reasoning_parser`: how its thinking is told from its answer (None: it is not)."""
        if not served_model_names:
            raise ValueError("served_model_names must name at least one model")
        self.async_engine = async_engine
        self.served_model_names = list(served_model_names)
        self.chat_template = chat_template
        self.metrics = metrics
        self.tokenizer = async_engine.get_tokenizer()
        template = chat_template or (self.tokenizer.chat_template if self.tokenizer else None)
        if tool_parser == "auto":  # the format the chat template asks the model for
            tool_parser = detect_tool_parser(template if not isinstance(template, dict)
                                             else "\n".join(template.values()))
            logger.info("tool-call parser: %s (from the chat template's markers)", tool_parser)
        self.tool_parser = get_tool_parser(tool_parser)  # for tool_choice "auto"
        self.reasoning_parser = (get_reasoning_parser(reasoning_parser)
                                 if reasoning_parser is not None else None)
        self.think_end_id = (self.tokenizer.added_vocab.get(self.reasoning_parser.END)
                             if self.reasoning_parser is not None and self.tokenizer else None)
        # Templates that know no tools get the default tool prompt (server/tools.py).
        self.template_knows_tools = template_knows_tools(template)
        info = async_engine.model_info
        # The thinking tags' ids, if the engine makes guided output wait for the thinking
        # (else it is guided from the first token).
        tags = info.reasoning_tags if self.reasoning_parser is not None else None
        vocab = self.tokenizer.added_vocab if self.tokenizer is not None else {}
        self.deferred_reasoning_ids = (
            (vocab[tags[0]], vocab[tags[1]]) if tags and tags[0] in vocab and tags[1] in vocab
            else None)
        self.max_model_len = info.max_model_len
        self.vocab_size = info.vocab_size
        # Text longer than this cannot fit the context whatever it says: refused before it
        # is tokenized (a 20 MB prompt would hold the tokenizer for a minute).
        self.max_prompt_chars = max_text_chars(
            self.max_model_len, self.tokenizer.max_token_chars if self.tokenizer else None)

    # ---- shared helpers ---------------------------------------------------------------
    def generate(self, request_id: str, prompt: dict,
                 params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """The engine's delta outputs for one prompt (see sampling_params)."""
        outputs = self.async_engine.generate(request_id, prompt, params)
        return self.metrics.track(outputs) if self.metrics is not None else outputs

    def model_name(self, requested: str | None) -> str:
        if requested is None:
            return self.served_model_names[0]
        if requested not in self.served_model_names:
            raise APIError(
                f"The model `{requested}` does not exist. Served models: "
                f"{', '.join(self.served_model_names)}", 404, param="model",
                code="model_not_found")
        return requested

    def _need_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise APIError(f"{what} needs a tokenizer, and this server runs without one")
        return self.tokenizer

    def check_chars(self, num_chars: int, param: str) -> None:
        """Refuse text that is too long for the context by its length alone."""
        if self.max_prompt_chars is not None and num_chars > self.max_prompt_chars:
            raise APIError(
                f"This model's maximum context length is {self.max_model_len} tokens. "
                f"However, your {param} has {num_chars} characters, more than that many "
                f"tokens can hold. Please reduce the length of the {param}.",
                param=param, code="context_length_exceeded")

    def check_length(self, num_prompt_tokens: int, max_tokens: int | None, param: str) -> None:
        limit = self.max_model_len
        if max_tokens is None and num_prompt_tokens >= limit:
            raise APIError(
                f"This model's maximum context length is {limit} tokens. However, your "
                f"{param} has {num_prompt_tokens} tokens, which leaves no room for the "
                f"completion. Please reduce the length of the {param}.",
                param=param, code="context_length_exceeded")
        if max_tokens is not None and num_prompt_tokens + max_tokens > limit:
            raise APIError(
                f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in "
                f"the {param}, {max_tokens} in the completion). Please reduce the length of "
                f"the {param} or the completion.",
                param=param, code="context_length_exceeded")

    def _check_token_ids(self, ids: list[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(f"{param} token ids must be in [0, {self.vocab_size}), got {bad[:5]}",
                           param=param)

    def sampling_params(self, request: SamplingRequest, **overrides: Any) -> SamplingParams:
        kwargs = sampling_kwargs(request)
        if request.logit_bias:
            bias = {}
            for key, value in request.logit_bias.items():
                try:
                    bias[int(key)] = value
                except ValueError:
                    raise APIError(f"logit_bias keys must be token ids, got {key!r}",
                                   param="logit_bias") from None
            self._check_token_ids(list(bias), "logit_bias")
            kwargs["logit_bias"] = bias
        if request.stop_token_ids:
            self._check_token_ids(request.stop_token_ids, "stop_token_ids")
        # Deltas, streamed or not: a step's output costs O(new tokens), and the metrics see
        # every step (non-streamed answers are put together in _collect).
        kwargs["output_kind"] = RequestOutputKind.DELTA
        kwargs.update(overrides)
        try:
            return SamplingParams(**kwargs)
        except (ValueError, TypeError) as exc:
            raise engine_error(exc) from None

    @staticmethod
    def token_str(token_id: int, logprob: Logprob | None = None) -> str:
        # The engine fills decoded_token (cached there) whenever it has a tokenizer.
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return f"token_id:{token_id}"

    async def _first(self, merged: AsyncIterator[tuple[int, RequestOutput]]):
        """Await the first output before answering, so input errors get their status
        code rather than an error inside a 200 stream."""
        try:
            return await merged.__anext__()
        except StopAsyncIteration:
            return None
        except Exception as exc:
            error = engine_error(exc)
            if error is None:
                raise
            raise error from None

    async def _collect(self, merged: AsyncIterator[tuple[int, RequestOutput]], count: int,
                       done: Callable[[RequestOutput], bool] | None = None,
                       ) -> list[RequestOutput]:
        """Each prompt's whole output, put together from its deltas; with `done`, only
        until done(delta) says the answer is complete."""
        finals = [DeltaAccumulator() for _ in range(count)]
        try:
            async for i, output in merged:
                finals[i].add(output)
                if done is not None and done(output):
                    break
        except Exception as exc:
            error = engine_error(exc)
            if error is None:
                raise
            raise error from None
        finally:
            await merged.aclose()
        results = [final.result() for final in finals]
        # The engine aborts a request the client still waits for only when it shuts down.
        if any(out.finish_reason == "abort" for final in results for out in final.outputs):
            raise engine_error(EngineShutDownError("the request was aborted before it finished"))
        return results

    async def _stream(self, merged, first, chunks) -> AsyncIterator[str]:
        """SSE framing around `chunks(outputs)`; a mid-stream error becomes an error event."""

        async def outputs():
            if first is not None:
                yield first
            async for item in merged:
                yield item

        try:
            async for chunk in chunks(outputs()):
                yield chunk
        except Exception as exc:
            error = engine_error(exc) or internal_error(exc, "a stream")
            yield _sse(json.dumps(error_body(error)))
        finally:
            with anyio.CancelScope(shield=True):
                await merged.aclose()
        yield _sse("[DONE]")

    # ---- chat completions -------------------------------------------------------------
    async def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool,
                          tools: list[dict] | None = None,
                          template_kwargs: dict[str, Any] | None = None,
                          ) -> tuple[str, list[int]]:
        """The chat template's text and its token ids; `tools` go in the prompt (through
        the template, or as the default tool prompt where the template knows none);
        `template_kwargs` are variables for the template (chat_template_kwargs)."""
        tokenizer = self._need_tokenizer("chat messages")
        self.check_chars(text_chars(messages) + text_chars(tools)
                         + text_chars(template_kwargs), "messages")
        reserved = sorted(RESERVED_TEMPLATE_KWARGS.intersection(template_kwargs or ()))
        if reserved:
            raise APIError(f"chat_template_kwargs may not set {', '.join(reserved)}: the "
                           "request's own fields do", param="chat_template_kwargs")
        knows_tools = self.template_knows_tools
        kwargs = dict(template_kwargs or {})
        if tools and knows_tools:
            kwargs["tools"] = tools
        try:
            return await tokenizer.render_chat(
                conversation(messages, tools, knows_tools),
                add_generation_prompt=add_generation_prompt, chat_template=self.chat_template,
                **kwargs)
        except Exception as exc:  # no template, or the template rejected the messages
            raise APIError(f"cannot apply the chat template: {exc}", param="messages") from None

    async def start_chat(self, request: ChatCompletionRequest, id_prefix: str = "chatcmpl-",
                         ) -> ChatRun:
        """Validate, render and submit a chat request: what chat completions and the
        Responses API (server/responses.py) share. Bad input raises APIError here."""
        model = self.model_name(request.model)
        plan = ToolPlan.from_request(request)
        guide, guide_field = guided_decoding(request, plan.guide_schema)
        text, prompt_ids = await self.render_chat(request.messages,
                                                  request.add_generation_prompt,
                                                  plan.prompt_tools, chat_template_kwargs(request))
        max_tokens = (request.max_completion_tokens if request.max_completion_tokens is not None
                      else request.max_tokens)
        self.check_length(len(prompt_ids), max_tokens, "messages")
        top_n = request.top_logprobs or 0
        overrides = {}
        if plan.mode == "auto" and self.tool_parser.needs_special_tokens:
            overrides["skip_special_tokens"] = False  # the calls' markers are such tokens
        params = self.sampling_params(request, max_tokens=max_tokens,
                                      logprobs=top_n if request.logprobs else None,
                                      guided_decoding=guide, **overrides)
        request_id = f"{id_prefix}{uuid.uuid4().hex}"
        merged = merge_async_iterators(self.generate(
            request_id, {"prompt": text, "prompt_token_ids": prompt_ids}, params))

        opens = None  # the parser's own default
        if guide is not None:
            # The grammar holds from the first token, unless the engine lets the model think
            # first: then it is thinking from the start just where the prompt opened it (the
            # engine's own rule, on the same ids).
            opens = (self.deferred_reasoning_ids is not None
                     and thinking_state(prompt_ids, *self.deferred_reasoning_ids) == "thinking")

        def new_reader() -> ChoiceReader:
            reasoning = None
            if self.reasoning_parser is not None:
                reasoning = self.reasoning_parser(opens)
            return ChoiceReader(reasoning, plan.new_reader(self.tool_parser),
                                request.include_reasoning, self.think_end_id)

        return ChatRun(request_id, model, merged, guide_field, new_reader, len(prompt_ids),
                       top_n, request.n)

    async def final_output(self, run: ChatRun) -> RequestOutput:
        """A non-streamed chat run's whole output. As in a stream, a choice that begins to
        repeat its tool calls is over there: once every choice is finished or over, the
        request is left (which aborts it) instead of running on to max_tokens."""
        watchers: dict[int, ChoiceReader] = {}
        over: set[int] = set()

        def all_over(delta: RequestOutput) -> bool:
            for out in delta.outputs:
                if out.index in over:
                    continue
                if out.index not in watchers:
                    watchers[out.index] = run.new_reader()
                watcher = watchers[out.index]
                watcher.stream(out.text, finished=out.finish_reason is not None)
                if out.finish_reason is not None or watcher.done:
                    over.add(out.index)
            return len(over) == run.num_choices

        watch = run.new_reader().tools is not None  # only tool calls end a reply early
        (final,) = await _naming_guide(
            self._collect(run.merged, 1, all_over if watch else None), run.guide_field)
        for out in final.outputs:
            if out.finish_reason is None:  # cut where it began to repeat
                out.finish_reason = "stop"
        return final

    async def first_output(self, run: ChatRun):
        """A streamed run's first output (awaited before answering: input errors the
        engine finds get their status code, not an error inside a 200 stream)."""
        return await _naming_guide(self._first(run.merged), run.guide_field)

    async def chat(self, request: ChatCompletionRequest):
        run = await self.start_chat(request)
        if not request.stream:
            final = await self.final_output(run)
            return JSONResponse(self._chat_response(run.request_id, run.model, final, run.top_n,
                                                    run.new_reader).model_dump(mode="json"))
        first = await self.first_output(run)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        chunks = lambda outputs: self._chat_chunks(  # noqa: E731
            outputs, run.request_id, run.model, request.n, run.num_prompt_tokens, include_usage,
            request.logprobs, run.top_n, run.new_reader)
        return StreamingResponse(self._stream(run.merged, first, chunks),
                                 media_type="text/event-stream")

    def _chat_logprobs(self, token_ids: list[int], logprobs: list[dict[int, Logprob]],
                       top_n: int) -> ChatChoiceLogprobs:
        content = []
        for token_id, entry in zip(token_ids, logprobs):
            top = sorted((lp.rank, t, lp) for t, lp in entry.items()
                         if lp.rank is not None and lp.rank <= top_n)
            token = self.token_str(token_id, entry[token_id])
            content.append(ChatTokenLogprob(
                token=token, logprob=_clamp(entry[token_id]), bytes=list(token.encode()),
                top_logprobs=[TopLogprob(token=(s := self.token_str(t, lp)), logprob=_clamp(lp),
                                         bytes=list(s.encode())) for _, t, lp in top]))
        return ChatChoiceLogprobs(content=content)

    def _chat_response(self, request_id: str, model: str, final: RequestOutput,
                       top_n: int, new_reader) -> ChatCompletionResponse:
        choices = []
        for out in final.outputs:
            reader = new_reader()
            reasoning, content, calls = reader.parse(out.text)
            message = ChatResponseMessage(
                content=content, reasoning_content=reasoning, reasoning=reasoning,
                tool_calls=[ToolCall(id=c.id, function=FunctionCall(name=c.name,
                                                                    arguments=c.arguments))
                            for c in calls])
            choices.append(ChatChoice(
                index=out.index, message=message,
                logprobs=(self._chat_logprobs(out.token_ids, out.logprobs, top_n)
                          if out.logprobs is not None else None),
                finish_reason=_finish_reason(out.finish_reason, reader.tools),
                stop_reason=out.stop_reason))
        num_generated = sum(len(out.token_ids) for out in final.outputs)
        usage = UsageInfo(prompt_tokens=len(final.prompt_token_ids),
                          completion_tokens=num_generated,
                          total_tokens=len(final.prompt_token_ids) + num_generated)
        return ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=usage)

    async def _chat_chunks(self, outputs, request_id: str, model: str, n: int,
                           num_prompt_tokens: int, include_usage: bool, want_logprobs: bool,
                           top_n: int, new_reader) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
            return _sse(ChatCompletionChunk(id=request_id, created=created, model=model,
                                            choices=choices, usage=usage).model_dump_json())

        for i in range(n):
            yield chunk([ChatStreamChoice(index=i, delta={"role": "assistant", "content": ""})])
        streams = [ChoiceStream() for _ in range(n)]
        readers = [new_reader() for _ in range(n)]
        async for _, output in outputs:
            for out in output.outputs:
                if not streams[out.index].advance(out, want_logprobs):
                    continue
                text = out.text
                logprobs = None
                if want_logprobs:
                    logprobs = self._chat_logprobs(out.token_ids, out.logprobs, top_n)
                reader = readers[out.index]
                deltas = reader.stream(text, finished=out.finish_reason is not None)
                # Over when the engine says so, or when the reply began repeating its calls
                # (then the last chunk's finish_reason is "tool_calls" already).
                over = out.finish_reason is not None or reader.done
                if not deltas and logprobs is None and not over:
                    continue  # held back: may be the start of a tag
                deltas = deltas or [{}]
                for k, d in enumerate(deltas):
                    last = k == len(deltas) - 1
                    reason = _finish_reason(out.finish_reason, reader.tools) if last else None
                    yield chunk([ChatStreamChoice(
                        index=out.index, delta=d, logprobs=logprobs if k == 0 else None,
                        finish_reason=reason, stop_reason=out.stop_reason if last else None)])
                if reader.done:
                    streams[out.index].finished = True  # what follows is dropped
            if all(stream.finished for stream in streams):
                break  # leaving aborts what the engine still generates
        if include_usage:
            total = sum(s.num_generated for s in streams)
            yield chunk([], UsageInfo(prompt_tokens=num_prompt_tokens, completion_tokens=total,
                                      total_tokens=num_prompt_tokens + total))

    # ---- tokenizer endpoints ----------------------------------------------------------
    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        self.model_name(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise APIError("give exactly one of prompt and messages", param="prompt")
        if request.messages is not None:
            _, ids = await self.render_chat(request.messages, request.add_generation_prompt,
                                            tool_dicts(request.tools),
                                            request.chat_template_kwargs)
        else:
            tokenizer = self._need_tokenizer("tokenize")
            self.check_chars(len(request.prompt), "prompt")
            ids = await tokenizer.encode(request.prompt,
                                         add_special_tokens=request.add_special_tokens)
        return TokenizeResponse(count=len(ids), max_model_len=self.max_model_len, tokens=ids)

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self.model_name(request.model)
        self._check_token_ids(request.tokens, "tokens")
        text = await self._need_tokenizer("detokenize").decode(request.tokens)
        return DetokenizeResponse(prompt=text)

    # ---- text completions -------------------------------------------------------------
    async def _completion_prompts(self, prompt) -> list[tuple[str | None, list[int]]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise APIError("prompt must not be empty", param="prompt")
        for p in prompt:  # all of them before tokenizing any
            if isinstance(p, str):
                self.check_chars(len(p), "prompt")
        prompts = []
        for p in prompt:
            if isinstance(p, str):
                prompts.append((p, await self._need_tokenizer("text prompts").encode(p)))
            else:
                if not p:
                    raise APIError("prompt must not be empty", param="prompt")
                self._check_token_ids(p, "prompt")
                prompts.append((None, list(p)))
        return prompts

    async def completion(self, request: CompletionRequest):
        model = self.model_name(request.model)
        if request.suffix is not None:
            raise APIError("suffix is not supported by this server", param="suffix")
        if request.best_of is not None and request.best_of != request.n:
            raise APIError("best_of other than n is not supported by this server",
                           param="best_of")
        prompts = await self._completion_prompts(request.prompt)
        for _, ids in prompts:
            self.check_length(len(ids), request.max_tokens, "prompt")
        echo_logprobs = request.echo and request.logprobs is not None
        guide, guide_field = guided_decoding(request)
        params = self.sampling_params(
            request, max_tokens=request.max_tokens, logprobs=request.logprobs,
            prompt_logprobs=request.logprobs if echo_logprobs else None, guided_decoding=guide)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        generators = []
        for i, (text, ids) in enumerate(prompts):
            engine_prompt = {"prompt_token_ids": ids}
            if text is not None:
                engine_prompt["prompt"] = text
            generators.append(self.generate(f"{request_id}-{i}", engine_prompt,
                                                         params))
        merged = merge_async_iterators(*generators)
        echo_texts = [await self._echo_text(text, ids) if request.echo else ""
                      for text, ids in prompts]
        # The first prompt token has no logprob entry to take its text from.
        first_tokens = [await self.tokenizer.decode(ids[:1])
                        if echo_logprobs and self.tokenizer is not None else None
                        for _, ids in prompts]
        if not request.stream:
            finals = await _naming_guide(self._collect(merged, len(prompts)), guide_field)
            return JSONResponse(self._completion_response(
                request_id, model, finals, request, echo_texts, first_tokens
            ).model_dump(mode="json"))
        first = await _naming_guide(self._first(merged), guide_field)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        chunks = lambda outputs: self._completion_chunks(  # noqa: E731
            outputs, request_id, model, request, prompts, echo_texts, first_tokens,
            include_usage)
        return StreamingResponse(self._stream(merged, first, chunks),
                                 media_type="text/event-stream")

    async def _echo_text(self, text: str | None, ids: list[int]) -> str:
        if text is not None:
            return text
        return await self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def _completion_logprobs(self, token_ids: list[int],
                             logprobs: list[dict[int, Logprob] | None], top_n: int,
                             offset: int, into: CompletionLogprobs | None = None,
                             first_token: str | None = None) -> CompletionLogprobs:
        """`first_token`: the text of a prompt's first token, which has no entry."""
        result = into or CompletionLogprobs()
        for token_id, entry in zip(token_ids, logprobs):
            if entry is None and first_token is not None:
                token = first_token
            else:
                token = self.token_str(token_id, entry[token_id] if entry else None)
            result.tokens.append(token)
            result.text_offset.append(offset)
            offset += len(token)
            if entry is None:  # the first prompt token has no logprob
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
                continue
            result.token_logprobs.append(_clamp(entry[token_id]))
            result.top_logprobs.append({
                self.token_str(t, lp): _clamp(lp) for t, lp in entry.items()
                if t == token_id or (lp.rank is not None and lp.rank <= top_n)})
        return result

    def _completion_choice(self, index: int, out: CompletionOutput, final: RequestOutput,
                           request: CompletionRequest, echo_text: str,
                           first_token: str | None) -> CompletionChoice:
        logprobs = None
        if request.logprobs is not None and out.logprobs is not None:
            logprobs = CompletionLogprobs()
            if request.echo and final.prompt_logprobs is not None:
                self._completion_logprobs(final.prompt_token_ids, final.prompt_logprobs,
                                          request.logprobs, 0, logprobs, first_token)
            offset = len(echo_text)
            self._completion_logprobs(out.token_ids, out.logprobs, request.logprobs, offset,
                                      logprobs)
        return CompletionChoice(index=index, text=echo_text + out.text, logprobs=logprobs,
                                finish_reason=out.finish_reason, stop_reason=out.stop_reason)

    def _completion_response(self, request_id: str, model: str, finals: list[RequestOutput],
                             request: CompletionRequest, echo_texts: list[str],
                             first_tokens: list[str | None]) -> CompletionResponse:
        choices = []
        num_prompt = num_generated = 0
        for p, final in enumerate(finals):
            num_prompt += len(final.prompt_token_ids)
            for out in final.outputs:
                num_generated += len(out.token_ids)
                choices.append(self._completion_choice(p * request.n + out.index, out, final,
                                                       request, echo_texts[p],
                                                       first_tokens[p]))
        usage = UsageInfo(prompt_tokens=num_prompt, completion_tokens=num_generated,
                          total_tokens=num_prompt + num_generated)
        return CompletionResponse(id=request_id, model=model, choices=choices, usage=usage)

    async def _completion_chunks(self, outputs, request_id: str, model: str,
                                 request: CompletionRequest, prompts, echo_texts: list[str],
                                 first_tokens: list[str | None],
                                 include_usage: bool) -> AsyncIterator[str]:
        created = int(time.time())
        n = request.n
        want_logprobs = request.logprobs is not None

        def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
            return _sse(CompletionResponse(id=request_id, created=created, model=model,
                                           choices=choices, usage=usage).model_dump_json())

        total = len(prompts) * n
        streams = [ChoiceStream() for _ in range(total)]
        echoed = [not request.echo] * total
        text_offset = [len(echo_texts[i // n]) for i in range(total)]
        # Deltas carry the prompt's logprobs once, in a prompt's first output; a choice
        # that starts later echoes them too.
        prompt_logprobs: list = [None] * len(prompts)
        async for p, output in outputs:
            if output.prompt_logprobs is not None:
                prompt_logprobs[p] = output.prompt_logprobs
            for out in output.outputs:
                i = p * n + out.index
                if streams[i].finished:
                    continue
                if not echoed[i]:
                    echoed[i] = True
                    logprobs = None
                    if want_logprobs and prompt_logprobs[p] is not None:
                        logprobs = self._completion_logprobs(
                            output.prompt_token_ids, prompt_logprobs[p], request.logprobs, 0,
                            first_token=first_tokens[p])
                    yield chunk([CompletionChoice(index=i, text=echo_texts[p],
                                                  logprobs=logprobs)])
                if not streams[i].advance(out, want_logprobs):
                    continue
                text = out.text
                logprobs = None
                if want_logprobs:
                    logprobs = self._completion_logprobs(
                        out.token_ids, out.logprobs, request.logprobs, text_offset[i])
                    text_offset[i] += sum(len(t) for t in logprobs.tokens)
                yield chunk([CompletionChoice(index=i, text=text, logprobs=logprobs,
                                              finish_reason=out.finish_reason,
                                              stop_reason=out.stop_reason)])
        if include_usage:
            num_prompt = sum(len(ids) for _, ids in prompts)
            generated = sum(s.num_generated for s in streams)
            yield chunk([], UsageInfo(prompt_tokens=num_prompt, completion_tokens=generated,
                                      total_tokens=num_prompt + generated))



# OpenAI's cap on inputs in one embeddings request.
MAX_EMBEDDING_INPUTS = 2048
EMBEDDING_OVERFLOW = ("truncate", "error")


class OpenAIServingEmbedding:
    """/v1/embeddings over an AsyncEmbeddingEngine; with none, every request is a clear 404."""

    def __init__(self, engine: AsyncEmbeddingEngine | None, model_name: str | None = None,
                 chat_model_names: list[str] | None = None, overflow: str = "truncate") -> None:
        """`overflow`: what an input longer than the model's max_seq_length gets when the
        request does not say (truncate_prompt_tokens): "truncate" (to its first tokens, as
        sentence-transformers does) or "error" (a 400)."""
        if overflow not in EMBEDDING_OVERFLOW:
            raise ValueError(f"overflow must be one of {EMBEDDING_OVERFLOW}, got {overflow!r}")
        self.overflow = overflow
        self.engine = engine
        self.model_name = model_name or (engine.name if engine is not None else None)
        self.chat_model_names = list(chat_model_names or [])

    def _check_model(self, requested: str | None) -> str:
        if self.engine is None:
            raise APIError("This server serves no embedding model (start it with "
                           "--embedding-model PATH, and without --no-embedding-model)",
                           404, param="model", code="model_not_found")
        if requested is None or requested == self.model_name:
            return self.model_name
        why = ("is a chat/completions model" if requested in self.chat_model_names
               else "does not exist")
        raise APIError(f"The model `{requested}` {why}. The embedding model served here is "
                       f"`{self.model_name}`", 404, param="model", code="model_not_found")

    @staticmethod
    def _inputs(value) -> list[str] | list[list[int]]:
        if isinstance(value, str):
            inputs = [value]
        elif value and all(isinstance(x, int) for x in value):
            inputs = [value]  # one input given as token ids
        else:
            inputs = list(value)
        if not inputs:
            raise APIError("input must not be empty", param="input")
        if len(inputs) > MAX_EMBEDDING_INPUTS:
            raise APIError(f"input has {len(inputs)} items; at most {MAX_EMBEDDING_INPUTS} "
                           "are allowed in one request", param="input")
        empty = [i for i, x in enumerate(inputs) if len(x) == 0]
        if empty:
            raise APIError(f"input[{empty[0]}] is empty; every input must have text or tokens",
                           param="input")
        return inputs

    def _truncate_to(self, truncate_prompt_tokens: int | None) -> int | None:
        limit = self.engine.max_seq_length
        if truncate_prompt_tokens is None:
            return limit if self.overflow == "truncate" else None
        if truncate_prompt_tokens == -1:
            return limit
        low = self.engine.min_truncation
        if not low <= truncate_prompt_tokens <= limit:
            raise APIError(f"truncate_prompt_tokens must be -1 (the model's maximum, {limit}) "
                           f"or from {low} to {limit}, got {truncate_prompt_tokens}",
                           param="truncate_prompt_tokens")
        return truncate_prompt_tokens

    async def embed(self, request: EmbeddingRequest) -> JSONResponse:
        model = self._check_model(request.model)
        if request.dimensions is not None and request.dimensions != self.engine.dim:
            raise APIError(f"dimensions={request.dimensions} is not supported: `{model}` only "
                           f"gives {self.engine.dim}-dimensional embeddings (omit dimensions, "
                           f"or send {self.engine.dim})", param="dimensions")
        inputs = self._inputs(request.input)
        truncate_to = self._truncate_to(request.truncate_prompt_tokens)
        # Asked for, truncation keeps the last tokens, as vLLM's truncate_prompt_tokens
        # does; the server's own (--embedding-overflow) keeps the first, as
        # sentence-transformers does.
        keep = "first" if request.truncate_prompt_tokens is None else "last"
        try:
            vectors, counts = await self.engine.embed(inputs, truncate_to, keep)
        except InputTooLongError as exc:
            raise APIError(str(exc), param="input", code="context_length_exceeded") from None
        except ValueError as exc:  # bad token ids and the like
            raise APIError(str(exc), param="input") from None
        if request.encoding_format == "base64":  # what the openai SDK asks for by default
            little_endian = vectors.numpy().astype("<f4", copy=False)
            embeddings = [base64.b64encode(row.tobytes()).decode("ascii")
                          for row in little_endian]
        else:
            embeddings = vectors.tolist()
        num_tokens = sum(counts)
        response = EmbeddingResponse(
            data=[EmbeddingData(index=i, embedding=e) for i, e in enumerate(embeddings)],
            model=model, usage=EmbeddingUsage(prompt_tokens=num_tokens, total_tokens=num_tokens))
        return JSONResponse(response.model_dump(mode="json"))
