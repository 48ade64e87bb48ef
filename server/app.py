"""The FastAPI app: OpenAI routes, errors in OpenAI's JSON shape, the API key check.
Talks to the engine only through AsyncEngine (the work is in server/serving.py)."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from pagedserve.engine.async_engine import AsyncEngine
from pagedserve.engine.embedding import AsyncEmbeddingEngine
from pagedserve.server.errors import APIError, error_body, internal_error
from pagedserve.server.metrics import ServerMetrics
from pagedserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from pagedserve.server.responses import OpenAIServingResponses, ResponsesRequest
from pagedserve.server.serving import OpenAIServing, OpenAIServingEmbedding

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 32 << 20  # far above any prompt that fits a context
DEFAULT_BODY_TIMEOUT_S = 30.0  # for the whole body to arrive


def _package_version() -> str:
    try:
        return version("pagedserve")
    except PackageNotFoundError:
        return "unknown"


def error_response(error: APIError) -> JSONResponse:
    # Overloaded, rate-limited or going away: say when to come back, as OpenAI's API does
    # (a balancer retries elsewhere), but not when the engine is dead: no retry helps.
    retry = error.status_code == 429 or error.code in ("engine_overloaded",
                                                       "server_shutting_down")
    headers = {"Retry-After": "1"} if retry else {}
    if error.status_code == 401:  # the scheme to answer with (RFC 6750)
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error_body(error), status_code=error.status_code, headers=headers)


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError("invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return APIError(f"The request body is not valid JSON: {first.get('msg')}")
    # One message per field: a union field (prompt, stop) fails once per union branch.
    by_field: dict[str, str] = {}
    for err in errors:
        loc = [str(part) for part in err.get("loc", ()) if part != "body"]
        got = f" (got {err['input']!r:.100})" if loc and "input" in err else ""
        if "field" in (err.get("ctx") or {}):  # a whole-body check that names its field
            loc, got = [err["ctx"]["field"]], ""
        field = loc[0] if loc else "body"
        # An unknown key inside an object (structured_outputs.whitespace_pattern): name it.
        shown = ".".join(loc) if err.get("type") == "extra_forbidden" else field
        if field not in by_field:
            by_field[field] = f"{shown}: {err.get('msg')}{got}"
    param = next((f for f in by_field if f != "body"), None)
    return APIError("Invalid request: " + "; ".join(by_field.values()), param=param)


async def cancel_on_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Await `work`, cancelling it if the client goes away first: a non-streaming request
    then aborts in the engine too. (Streams notice disconnects in StreamingResponse.)"""
    handler = asyncio.ensure_future(work)

    async def wait_for_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    listener = asyncio.ensure_future(wait_for_disconnect())
    try:
        await asyncio.wait([handler, listener], return_when=asyncio.FIRST_COMPLETED)
    finally:
        listener.cancel()
        if not handler.done():
            handler.cancel()
    if handler.cancelled() or not handler.done():
        await asyncio.gather(handler, return_exceptions=True)
        logger.info("client disconnected from %s; request aborted", request.url.path)
        return Response(status_code=499)  # nobody reads it
    return handler.result()


class APIKeyMiddleware:
    """Requires `Authorization: Bearer <key>` (the scheme in any case, one header only) on
    /v1/*, /tokenize and /detokenize, and on /metrics if asked; the key is compared in
    constant time. /health and /version stay open. Plain ASGI (not BaseHTTPMiddleware) so
    streaming and disconnects pass through as is."""

    def __init__(self, app: ASGIApp, api_key: str, protect_metrics: bool = False) -> None:
        self.app = app
        self.expected = api_key.strip().encode()
        self.prefixes = ("/v1", "/tokenize", "/detokenize") + (
            ("/metrics",) if protect_metrics else ())

    def _guarded(self, path: str) -> bool:
        return any(path == p or path.startswith(p + "/") for p in self.prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The path as routing sees it: under a root_path, scope["path"] carries the prefix.
        if (scope["type"] == "http" and scope["method"] != "OPTIONS"
                and self._guarded(get_route_path(scope))):
            given = [v for k, v in scope["headers"] if k == b"authorization"]
            error = None
            if len(given) > 1:
                error = APIError("Send one Authorization header, not several", 400,
                                 code="invalid_authorization_header")
            else:
                scheme, _, key = (given[0] if given else b"").strip().partition(b" ")
                # compare_digest on the key whatever the scheme, so timing tells nothing.
                key_ok = hmac.compare_digest(key.strip(), self.expected)
                if not (key_ok and scheme.lower() == b"bearer"):
                    error = APIError("Incorrect or missing API key: send it as "
                                     "'Authorization: Bearer <key>'", 401,
                                     code="invalid_api_key")
            if error is not None:
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RequestBodyMiddleware:
    """Reads every request body here, before the app: 413 for one over `max_bytes` (by
    Content-Length, or as a chunked body streams in; FastAPI would turn an error while it
    reads into a 400), 408 for one that takes longer than `timeout_s` to arrive (a client
    trickling its body would hold a connection forever)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        chunks, size, more = [], 0, True
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except TimeoutError:
                await error_response(APIError(
                    f"The request body did not arrive within {self.timeout_s:g} s", 408,
                    code="request_timeout"))(scope, receive, send)
                return
            if message["type"] != "http.request":  # the client left mid-body
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
        body: bytes | None = b"".join(chunks)
        chunks.clear()  # one copy of the body, not two, while the request runs

        async def replay() -> dict:
            nonlocal body
            if body is not None:
                message = {"type": "http.request", "body": body, "more_body": False}
                body = None
                return message
            return await receive()  # then disconnect notices, as usual

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(APIError(
            f"The request body is larger than this server's limit of {self.max_bytes} bytes",
            413, code="request_too_large"))
        await response(scope, receive, send)


def build_app(async_engine: AsyncEngine, served_model_names: list[str],
              api_key: str | None = None, chat_template: str | None = None, *,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              embedding_engine: AsyncEmbeddingEngine | None = None,
              embedding_model_name: str | None = None,
              tool_call_parser: str = "auto", reasoning_parser: str | None = None,
              protect_metrics: bool = False,
              enable_docs: bool = True,
              body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
              embedding_overflow: str = "truncate") -> FastAPI:
    """The OpenAI-compatible app over a running AsyncEngine (and, for /v1/embeddings, an
    AsyncEmbeddingEngine); shuts them down when the app stops (its lifespan).
    `tool_call_parser`: how tool calls are read from tool_choice "auto" output ("auto":
    from the chat template).
    `reasoning_parser`: how a reasoning model's thinking is told from its answer.
    `protect_metrics`: /metrics needs the API key too. `enable_docs`: serve /docs, /redoc
    and /openapi.json. `body_timeout_s`: how long a request's body may take to arrive.
    `embedding_overflow`: "truncate" or "error" for an embedding input over the model's
    max_seq_length whose request does not say (truncate_prompt_tokens)."""
    metrics = ServerMetrics(async_engine)
    serving = OpenAIServing(async_engine, served_model_names, chat_template, metrics,
                            tool_parser=tool_call_parser, reasoning_parser=reasoning_parser)
    serving_responses = OpenAIServingResponses(serving)
    serving_embedding = OpenAIServingEmbedding(embedding_engine, embedding_model_name,
                                               served_model_names, embedding_overflow)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await async_engine.shutdown()
        if embedding_engine is not None:
            await asyncio.to_thread(embedding_engine.shutdown)

    docs = {} if enable_docs else dict(docs_url=None, redoc_url=None, openapi_url=None)
    app = FastAPI(title="pagedserve", version=_package_version(), lifespan=lifespan, **docs)
    app.state.serving = serving
    # The last added runs first: the key is checked before any body is read.
    app.add_middleware(RequestBodyMiddleware, max_bytes=max_body_bytes,
                       timeout_s=body_timeout_s)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key, protect_metrics=protect_metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(str(exc.detail), exc.status_code, kind))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return error_response(internal_error(exc, request.url.path))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, raw_request: Request):
        return await cancel_on_disconnect(raw_request, serving.chat(request))

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, raw_request: Request):
        return await cancel_on_disconnect(raw_request, serving.completion(request))

    @app.post("/v1/responses")
    async def responses(request: ResponsesRequest, raw_request: Request):
        return await cancel_on_disconnect(raw_request, serving_responses.create(request))

    def no_stored_response(response_id: str) -> APIError:
        # The SDK's responses.retrieve / delete: there is nothing stored to find.
        return APIError(f"No response {response_id!r}: this server stores no responses "
                        "(each one is answered and forgotten; store is always false)", 404,
                        param="response_id", code="response_not_found")

    @app.get("/v1/responses/{response_id}")
    async def retrieve_response(response_id: str):
        raise no_stored_response(response_id)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str):
        raise no_stored_response(response_id)

    @app.post("/v1/embeddings")
    async def embeddings(request: EmbeddingRequest, raw_request: Request):
        return await cancel_on_disconnect(raw_request, serving_embedding.embed(request))

    def model_cards() -> list[ModelCard]:
        # root: the model as the user named it (or its name), never a cache path.
        root = async_engine.model_info.model or served_model_names[0]
        cards = [ModelCard(id=name, root=root, max_model_len=serving.max_model_len)
                 for name in served_model_names]
        if embedding_engine is not None:
            cards.append(ModelCard(id=serving_embedding.model_name,
                                   root=embedding_engine.model_path or serving_embedding.model_name,
                                   max_model_len=embedding_engine.max_seq_length))
        return cards

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=model_cards())

    @app.get("/v1/models/{model_id:path}")  # ids may hold slashes: Qwen/Qwen3-0.6B
    async def retrieve_model(model_id: str) -> ModelCard:
        for card in model_cards():
            if card.id == model_id:
                return card
        raise APIError(f"The model `{model_id}` does not exist", 404, param="model",
                       code="model_not_found")

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> TokenizeResponse:
        return await serving.tokenize(request)

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> DetokenizeResponse:
        return await serving.detokenize(request)

    @app.get("/health")
    async def health() -> Response:
        if async_engine.is_healthy:
            return Response(status_code=200)
        return error_response(APIError("the engine is not running", 503,
                                       "service_unavailable_error", code="engine_dead"))

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def server_version() -> dict:
        return {"version": _package_version()}

    return app
