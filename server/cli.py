"""The `pagedserve` command. Heavy imports (torch, transformers) happen only inside the
subcommands, so `pagedserve --help` answers at once."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys

from pagedserve.server.reasoning_parsers import REASONING_PARSERS, get_reasoning_parser
from pagedserve.server.tool_parsers import TOOL_PARSERS

DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="HF model directory or .gguf file (default: the embedded "
                             "SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="auto",
                        choices=["auto", "float32", "float16", "bfloat16"],
                        help="activation and dense weight dtype (auto: bfloat16 on GPU; "
                             "float32 on CPU, bfloat16 for a quantized model on a CPU with "
                             "AVX512-BF16)")
    parser.add_argument("--kv-cache-dtype", default="auto",
                        choices=["auto", "float32", "float16", "bfloat16"],
                        help="KV cache dtype (auto: the activations'; another dtype on CPU "
                             "only)")
    parser.add_argument("--quantization", "-q", default="auto",
                        choices=["auto", "none", "int4", "int8"],
                        help="CPU weight-only quantization (auto: a GGUF file's own, as "
                             "llama.cpp serves it; an HF checkpoint as it is. none: dense "
                             "weights in --dtype, a GGUF dequantized. int4/int8: quantize "
                             "at load)")
    parser.add_argument("--quantized-dense-copy", default="auto", choices=["auto", "on", "off"],
                        help="keep a dense copy (bf16, or fp32 without AVX512-BF16) of "
                             "quantized weights for prefill and big "
                             "batches, several times faster there (auto: when it takes at "
                             "most 1/8 of the machine's memory)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="context length (default: the model's)")
    parser.add_argument("--max-num-seqs", type=int, default=128,
                        help="most sequences in one batch")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="token budget of one step, prefill chunks + decodes "
                             "(default: 512 on CPU, 2048 on GPU)")
    parser.add_argument("--block-size", type=int, default=16, help="KV cache block size in tokens")
    parser.add_argument("--kv-cache-memory", type=int, default=None,
                        help="CPU KV cache budget in bytes, all tensor-parallel ranks together "
                             "(default 4 GiB)")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                        default=True, help="reuse cached KV blocks of shared prompt prefixes")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="fraction of GPU memory the engine may use (weights, activations "
                             "and the KV cache)")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="run eagerly: no CUDA graphs for decode steps (GPU), no "
                             "torch.compile'd forward for quantized models (CPU)")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                        default=None,
                        help="schedule and launch each step before the previous step's "
                             "outputs are processed (default: on for GPUs, off for CPUs)")
    parser.add_argument("--attention-backend", default=None, choices=["torch", "triton"],
                        help="attention kernels (default: triton on GPU, torch on CPU)")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                        help="split the model over this many ranks: worker processes over "
                             "gloo on CPU, one GPU each over NCCL")
    parser.add_argument("--seed", type=int, default=0, help="seed for unseeded sampling")
    parser.add_argument("--log-level", default="warning",
                        choices=["debug", "info", "warning", "error"])


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        model=args.model, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype,
        max_model_len=args.max_model_len,
        quantization=args.quantization,
        quantized_dense_copy={"auto": None, "on": True, "off": False}[args.quantized_dense_copy],
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size, kv_cache_memory=args.kv_cache_memory,
        enable_prefix_caching=args.enable_prefix_caching, seed=args.seed,
        gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
        attention_backend=args.attention_backend, async_scheduling=args.async_scheduling,
        tensor_parallel_size=args.tensor_parallel_size,
        reasoning_tags=reasoning_tags(getattr(args, "reasoning_parser", None)),
    )


def reasoning_tags(parser_name: str | None) -> tuple[str, str] | None:
    """The engine's reasoning_tags for --reasoning-parser: guided output waits for the
    thinking to end."""
    if parser_name is None:
        return None
    parser = get_reasoning_parser(parser_name)
    return parser.START, parser.END


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)


def _sampling_params(args: argparse.Namespace):
    from pagedserve.engine import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k)


def cmd_generate(args: argparse.Namespace) -> int:
    from pagedserve.engine import LLM

    llm = LLM(**engine_kwargs(args))
    outputs = llm.generate(args.prompt, _sampling_params(args), use_tqdm=len(args.prompt) > 1)
    for output in outputs:
        print(output.prompt + output.outputs[0].text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from pagedserve.engine import LLM

    llm = LLM(**engine_kwargs(args))
    params = _sampling_params(args)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})

    def answer(message: str) -> str:
        history.append({"role": "user", "content": message})
        text = llm.chat(history, params, use_tqdm=False)[0].outputs[0].text
        history.append({"role": "assistant", "content": text})
        return text

    if args.message is not None:
        print(answer(args.message))
        return 0
    print("Chatting with the model; an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            message = input("> ").strip()
        except EOFError:
            break
        if not message:
            break
        print(answer(message))
    return 0


def read_chat_template(value: str | None) -> str | None:
    """--chat-template takes a file path or the Jinja template itself."""
    import os

    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{" not in value:
        raise SystemExit(f"--chat-template: {value!r} is neither a file nor a Jinja template")
    return value


def load_embedding_engine(args: argparse.Namespace, logger: logging.Logger):
    """The AsyncEmbeddingEngine for /v1/embeddings, or None: --no-embedding-model, or no
    --embedding-model and the embedded MiniLM package is not installed (a warning, not an
    error: chat still works). An explicit --embedding-model that fails to load is fatal."""
    if args.no_embedding_model:
        return None
    import torch

    from pagedserve.engine.embedding import AsyncEmbeddingEngine, EmbeddingEngine

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.embedding_model is None:
        try:
            engine = EmbeddingEngine(device=device)
        except FileNotFoundError as exc:
            logger.warning("/v1/embeddings is disabled: %s", exc)
            return None
    else:
        engine = EmbeddingEngine(args.embedding_model, device=device)
    logger.info("Embedding model %s (%s, dim %d) serves /v1/embeddings", engine.name,
                engine.model_dir, engine.dim)
    return AsyncEmbeddingEngine(engine, compute_threads=1)


def cmd_serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn
    from uvicorn.server import STARTUP_FAILURE

    from pagedserve.engine import EngineConfig
    from pagedserve.engine.async_engine import AsyncEngine
    from pagedserve.server.app import build_app
    from pagedserve.server.shutdown import GracefulServer

    logger = logging.getLogger("pagedserve.serve")
    chat_template = read_chat_template(args.chat_template)
    names = args.served_model_name or [args.model or DEFAULT_SERVED_NAME]
    # The engine thread is the process's one multi-threaded torch user: this thread (the
    # event loop, tokenization) and the embedding thread compute on one thread each, as
    # a second OpenMP pool slows the engine's kernels (see AsyncEngine).
    compute_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    async_engine = AsyncEngine(EngineConfig(**engine_kwargs(args)),
                               max_waiting_requests=args.max_waiting_requests,
                               grammar_compile_timeout=args.structured_output_compile_timeout,
                               compute_threads=compute_threads)
    embedding_engine = load_embedding_engine(args, logger)
    app = build_app(async_engine, names, api_key=args.api_key, chat_template=chat_template,
                    embedding_engine=embedding_engine, tool_call_parser=args.tool_call_parser,
                    reasoning_parser=args.reasoning_parser,
                    protect_metrics=args.protect_metrics, enable_docs=not args.disable_docs,
                    body_timeout_s=args.request_body_timeout,
                    embedding_overflow=args.embedding_overflow)
    logger.info("Serving %s (max_model_len=%d) on http://%s:%d/v1%s", ", ".join(names),
                   async_engine.model_info.max_model_len, args.host, args.port,
                   " (API key required)" if args.api_key else "")
    # On SIGTERM: stop accepting, let in-flight requests finish for up to
    # --shutdown-timeout seconds, then abort the rest in the engine (each stream still
    # ends with a finish_reason and [DONE]); the app's lifespan then stops the engine.
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level)
    server = GracefulServer(config, async_engine, drain_timeout=args.shutdown_timeout)
    # What is alive now (the model, torch's, transformers' and the app's state: ~0.5M
    # objects) moves to the GC's permanent generation, which collections do not walk: an
    # oldest-generation collection over it stalled the engine's step, and with it every
    # stream, for ~200 ms (vLLM freezes its heap after start-up too). Thawed before exit, so
    # that shutdown frees it as usual.
    gc.collect()
    gc.freeze()
    try:
        server.run()
    except KeyboardInterrupt:  # a second Ctrl-C: uvicorn's forced exit
        pass
    finally:
        gc.unfreeze()
    # As uvicorn.run: a server that never started (say, the port is taken) exits 3; one
    # whose engine died exits 1.
    if not server.started:
        return STARTUP_FAILURE
    return 1 if server.engine_died else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pagedserve",
        description="High-throughput LLM inference over a paged KV cache.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete prompts offline and print the results")
    add_engine_args(gen)
    gen.add_argument("--prompt", action="append", required=True,
                     help="a prompt to complete (repeat for a batch)")
    add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)
    chat = sub.add_parser("chat", help="chat with a model in the terminal (chat template)")
    add_engine_args(chat)
    chat.add_argument("--message", default=None, help="answer one message and exit")
    chat.add_argument("--system", default=None, help="a system prompt")
    add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)
    serve = sub.add_parser("serve", help="serve the model over the OpenAI API (HTTP)")
    add_engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                       help="model name(s) clients use; the first is reported in responses "
                            f"(default: MODEL, or {DEFAULT_SERVED_NAME})")
    serve.add_argument("--api-key", default=os.environ.get("PAGEDSERVE_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize and "
                            "/detokenize; /health, /version and /metrics stay open "
                            "(default: $PAGEDSERVE_API_KEY)")
    serve.add_argument("--protect-metrics", action="store_true",
                       help="with --api-key: require the key on /metrics too")
    serve.add_argument("--disable-docs", action="store_true",
                       help="serve no /docs, /redoc or /openapi.json")
    serve.add_argument("--request-body-timeout", type=float, default=30.0, metavar="S",
                       help="answer 408 to a request whose body takes longer to arrive")
    serve.add_argument("--structured-output-compile-timeout", type=float, default=5.0,
                       metavar="S",
                       help="answer 400 to a guided request whose schema, regex or grammar "
                            "takes longer to compile (compiling runs beside the engine, "
                            "which goes on serving everyone else)")
    serve.add_argument("--max-waiting-requests", type=int, default=None,
                       help="answer 503 when this many requests already wait (default: no cap)")
    serve.add_argument("--chat-template", default=None,
                       help="a Jinja chat template (file path or the template itself) "
                            "instead of the tokenizer's")
    serve.add_argument("--tool-call-parser", default="auto",
                       choices=["auto", *sorted(TOOL_PARSERS)],
                       help="the model's tool-call format, read from the output when "
                            "tool_choice is \"auto\": hermes (<tool_call>{...}</tool_call>, "
                            "which the default tool prompt asks for), qwen3_xml (Qwen3-Coder), "
                            "llama3_json (Llama 3.x JSON), pythonic (Llama 3.2 / 4), mistral "
                            "([TOOL_CALLS]); auto (default): from the chat template's markers")
    serve.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
                       help="a reasoning model's format: its <think>...</think> comes back as "
                            "message.reasoning_content (and reasoning), streamed as deltas, "
                            "never in content (deepseek_r1: the prompt opens the block; qwen3: "
                            "the model does); structured output holds after the thinking. "
                            "Default: none, thinking stays in content")
    serve.add_argument("--embedding-model", default=None, metavar="PATH",
                       help="sentence-transformers HF directory to serve on /v1/embeddings "
                            "(default: the embedded all-MiniLM-L6-v2, if installed)")
    serve.add_argument("--embedding-overflow", choices=["truncate", "error"],
                       default="truncate",
                       help="an embedding input over the model's max_seq_length: keep its "
                            "first tokens, as sentence-transformers does (usage counts what "
                            "was embedded), or answer 400; a request's truncate_prompt_tokens "
                            "overrides it")
    serve.add_argument("--no-embedding-model", action="store_true",
                       help="serve no embedding model (/v1/embeddings answers 404)")
    serve.add_argument("--shutdown-timeout", type=float, default=10.0,
                       help="seconds in-flight requests get to finish on SIGTERM before "
                            "they are aborted (streams then end with finish_reason "
                            "\"abort\" and [DONE], others get a 503); exit status 0")
    serve.set_defaults(func=cmd_serve, log_level="info")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
