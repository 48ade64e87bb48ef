"""pagedserve against llama.cpp's `llama-server` on a CPU, same GGUF, same workload, in one
run: streaming completions at several concurrencies, then each server's peak RSS.

    python benchmarks/cpu_vs_llamacpp.py                        # embedded SmolLM2 Q4_1
    python benchmarks/cpu_vs_llamacpp.py --concurrency 1,32 --num-prompts 16 --tag quick

llama-server is built once (benchmarks/llamacpp.py) and cached outside the repository.
Writes benchmarks/results/cpu_vs_llamacpp_<tag>.json, .md and .png (with matplotlib)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llamacpp import CACHE_DIR, ensure_llama_server  # noqa: E402
from serve import (  # noqa: E402
    RESULTS_DIR,
    WARMUP_REQUEST,
    free_port,
    launched_process,
    pagedserve_process,
    run_benchmark,
    synthetic_requests,
)

from pagedserve.engine.loader.default_model import default_model_path  # noqa: E402

SERVED_NAME = "model"


def peak_rss_mib(pid: int) -> float:
    """The process's high-water resident set (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def llama_server_command(binary: Path, gguf: Path, port: int, args) -> list[str]:
    slots = max(args.concurrency_list)
    return [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "-t", str(args.threads), "-tb", str(args.threads), "--parallel", str(slots),
            "-c", str(slots * (args.max_input_len + args.output_len + 64)),
            "--alias", SERVED_NAME, "--no-webui", *shlex.split(args.llama_args)]


def measure(name: str, cmd: list[str], port: int, specs_per_run, args, env=None) -> dict:
    """Start the server `cmd` (listening on port), run every concurrency's requests, stop it."""
    log_path = RESULTS_DIR / f".cpu_vs_llamacpp_{name}_{os.getpid()}.log"
    root = f"http://127.0.0.1:{port}"
    base_url = root + "/v1"
    print(f"starting {name}: {shlex.join(cmd)}", flush=True)
    with launched_process(cmd, root + "/health", log_path, startup_timeout_s=600,
                          env=env) as proc:
        asyncio.run(run_benchmark(base_url, SERVED_NAME, "completions", [WARMUP_REQUEST]))
        runs = []
        for concurrency, specs in zip(args.concurrency_list, specs_per_run):
            load = os.getloadavg()[0]
            run = asyncio.run(run_benchmark(base_url, SERVED_NAME, "completions", specs,
                                            max_concurrency=concurrency))
            run.pop("requests")
            run["loadavg_1m_before"] = load
            print(f"  {name} c={concurrency}: {run['completed']}/{len(specs)} ok, "
                  f"{run['output_throughput']:.1f} out tok/s, median TPOT "
                  f"{run['median_tpot_ms']:.1f} ms, median TTFT {run['median_ttft_ms']:.0f} ms",
                  flush=True)
            runs.append(run)
        rss = peak_rss_mib(proc.pid)
    log_path.unlink(missing_ok=True)
    return {"command": shlex.join(cmd), "runs": runs, "peak_rss_mib": rss}


def write_results(tag: str, result: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = RESULTS_DIR / f"cpu_vs_llamacpp_{tag}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    ours, peer = result["servers"]["pagedserve"], result["servers"]["llama-server"]
    lines = [
        f"# pagedserve vs llama.cpp's llama-server on a CPU: {tag}", "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}  ",
        f"Model: {result['model']}  ",
        f"Workload: {result['workload']}  ",
        f"llama-server: `{peer['command']}` ({result['llama_cpp']})  ",
        f"pagedserve: `{ours['command']}`", "",
        "| concurrency | llama-server out tok/s | pagedserve out tok/s | ratio | "
        "TPOT median llama-server / pagedserve | TTFT median llama-server / pagedserve | "
        "load avg before |",
        "|---|---|---|---|---|---|---|",
    ]
    for a, b in zip(peer["runs"], ours["runs"], strict=True):
        lines.append(
            f"| {a['max_concurrency']} | {a['output_throughput']:.1f} | "
            f"{b['output_throughput']:.1f} | {b['output_throughput'] / a['output_throughput']:.2f}x"
            f" | {a['median_tpot_ms']:.1f} ms / {b['median_tpot_ms']:.1f} ms | "
            f"{a['median_ttft_ms']:.0f} ms / {b['median_ttft_ms']:.0f} ms | "
            f"{a['loadavg_1m_before']:.2f} / {b['loadavg_1m_before']:.2f} |")
    lines += ["", f"Peak RSS: llama-server {peer['peak_rss_mib']:.0f} MiB, pagedserve "
              f"{ours['peak_rss_mib']:.0f} MiB.", "",
              "TPOT: (E2E - TTFT) / (output tokens - 1) per request; TTFT: send to first "
              "content chunk. Failed requests: "
              + ", ".join(f"{n} {sum(r['failed'] for r in s['runs'])}"
                          for n, s in result["servers"].items()) + "."]
    if result.get("note"):
        lines += ["", result["note"]]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(result, stem.with_suffix(".png"))
    return stem.with_suffix(".md")


def _plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (tput, tpot) = plt.subplots(1, 2, figsize=(10, 4))
    for name, server in result["servers"].items():
        c = [r["max_concurrency"] for r in server["runs"]]
        tput.plot(c, [r["output_throughput"] for r in server["runs"]], "o-", label=name)
        tpot.plot(c, [r["median_tpot_ms"] for r in server["runs"]], "o-", label=name)
    for ax, title in ((tput, "output tok/s (higher is better)"),
                      (tpot, "median TPOT, ms (lower is better)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{result['model']} on {result['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="GGUF file (default: embedded)")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--num-prompts", type=int, default=64, help="per concurrency")
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--max-input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--serve-args", default="", help="extra pagedserve serve arguments")
    p.add_argument("--llama-args", default="", help="extra llama-server arguments")
    p.add_argument("--skip", choices=["pagedserve", "llama-server"], default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="smollm2")
    args = p.parse_args(argv)
    args.concurrency_list = [int(c) for c in args.concurrency.split(",")]
    gguf = (args.model or default_model_path()).resolve()
    # Each concurrency gets prompts of its own; both servers get the same ones.
    specs = synthetic_requests(args.num_prompts * len(args.concurrency_list), args.input_len,
                               args.output_len, args.seed, args.max_input_len)
    per_run = [specs[i * args.num_prompts:(i + 1) * args.num_prompts]
               for i in range(len(args.concurrency_list))]

    servers = {}
    if args.skip != "llama-server":
        port = free_port()
        cmd = llama_server_command(ensure_llama_server(), gguf, port, args)
        servers["llama-server"] = measure("llama-server", cmd, port, per_run, args)
    if args.skip != "pagedserve":
        port = free_port()
        serve_args = [str(gguf), "--served-model-name", SERVED_NAME,
                      "--max-num-seqs", str(max(args.concurrency_list)),
                      *shlex.split(args.serve_args)]
        cmd, env = pagedserve_process(port, serve_args)
        servers["pagedserve"] = measure("pagedserve", cmd, port, per_run, args, env)
    result = {
        "command": "python benchmarks/cpu_vs_llamacpp.py " + shlex.join(
            sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "model": gguf.name,
        "workload": (f"{args.num_prompts} streaming completions per concurrency, "
                     f"{args.input_len}-{args.max_input_len} prompt words (about as many "
                     f"tokens), {args.output_len} output tokens, greedy, ignore_eos"),
        "llama_cpp": (CACHE_DIR / "sdist.txt").read_text().strip()
        if (CACHE_DIR / "sdist.txt").is_file() else "llama.cpp",
        "servers": servers,
    }
    if len(servers) == 2:
        print(f"wrote {write_results(args.tag, result)}")
    else:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
