"""The `pagedserve` command. Heavy imports (torch, transformers) happen only inside the
subcommands, so `pagedserve --help` answers at once."""

from __future__ import annotations

import argparse
import logging
import sys


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="HF model directory or .gguf file (default: the embedded "
                             "SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="auto",
                        choices=["auto", "float32", "float16", "bfloat16"],
                        help="weight and activation dtype (auto: float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="context length (default: the model's)")
    parser.add_argument("--max-num-seqs", type=int, default=128,
                        help="most sequences in one batch")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048,
                        help="token budget of one step (prefill chunks + decodes)")
    parser.add_argument("--block-size", type=int, default=16, help="KV cache block size in tokens")
    parser.add_argument("--kv-cache-memory", type=int, default=None,
                        help="CPU KV cache budget in bytes (default 4 GiB)")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                        default=True, help="reuse cached KV blocks of shared prompt prefixes")
    parser.add_argument("--seed", type=int, default=0, help="seed for unseeded sampling")
    parser.add_argument("--log-level", default="warning",
                        choices=["debug", "info", "warning", "error"])


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        model=args.model, dtype=args.dtype, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size, kv_cache_memory=args.kv_cache_memory,
        enable_prefix_caching=args.enable_prefix_caching, seed=args.seed,
    )


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)


def _sampling_params(args: argparse.Namespace):
    from engine import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k)


def cmd_generate(args: argparse.Namespace) -> int:
    from engine import LLM

    llm = LLM(**engine_kwargs(args))
    outputs = llm.generate(args.prompt, _sampling_params(args), use_tqdm=len(args.prompt) > 1)
    for output in outputs:
        print(output.prompt + output.outputs[0].text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from engine import LLM

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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
