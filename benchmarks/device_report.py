"""Summarise benchmarks/device_check.sh's per-part JSON files (and status.txt) in PARTS_DIR
into summary.md and one device_check.json in OUT_DIR (default: PARTS_DIR).

    python benchmarks/device_report.py PARTS_DIR [OUT_DIR]"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(out: Path, name: str) -> dict | None:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def table(header: list[str], rows: list[list]) -> list[str]:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(fmt(v) for v in row) + " |" for row in rows), ""]


def main() -> None:
    src = Path(sys.argv[1])
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else src
    parts = {name: load(src, name) for name in
             ("env", "kernels", "parity", "attention", "fused", "e2e_qwen3", "e2e_llama",
              "e2e_qwen3_sync", "tp")}
    lines = ["# GPU device check", "", "Command: `bash benchmarks/device_check.sh`", ""]
    status = (src / "status.txt").read_text() if (src / "status.txt").exists() else ""
    lines += ["Part status (rc 0 = passed; 124 = timed out):", "", "```", status.strip(), "```", ""]
    if parts["env"]:
        lines += [f"Environment: {parts['env']}", ""]
    pytest_log = src / "pytest.log"
    if pytest_log.exists():
        last = pytest_log.read_text().strip().splitlines()[-1:] or [""]
        lines += [f"Kernel test suite on CUDA (`pytest tests/kernels`): {last[0]}", ""]
    if parts["kernels"]:
        k = parts["kernels"]
        lines += [f"## Long-context kernel checks: all ok = {k['all_ok']}", ""]
        lines += table(["case", "ok", "max abs err"],
                       [[name, r["ok"], r.get("max_abs_err", "")]
                        for name, r in k["kernels"].items()])
    if parts["parity"]:
        p = parts["parity"]
        lines += [f"## Engine parity with HF transformers on {p.get('device', 'CUDA')}: "
                  f"all ok = {p['all_ok']}", ""]
        lines += ["Reference: HF fp32 on CPU; bf16 rows also against HF bf16 on the GPU, with "
                  "HF's own bf16-vs-fp32 agreement as the noise level.", ""]
        lines += table(["model / mode", "exact greedy", "agreement with HF fp32",
                        "max logprob err", "agreement with HF bf16", "HF bf16 vs HF fp32",
                        "first tokens = HF bf16", "CUDA graphs", "blocks leaked", "ok"],
                       [[name, r["exact_greedy"], r["token_agreement"],
                         r["max_logprob_err_on_agreeing_prefix"],
                         r.get("agreement_with_hf_bf16", "-"),
                         r.get("hf_bf16_vs_hf_fp32_agreement", "-"),
                         r.get("first_token_agreement_with_hf_bf16", "-"), r["cuda_graphs"],
                         r["blocks_leaked"], r["ok"]] for name, r in p["parity"].items()])
    if parts["tp"]:
        t = parts["tp"]
        lines += [f"## Tensor parallel size 2 against 1 (NCCL): all ok = {t['all_ok']}", ""]
        if "skipped" in t:
            lines += [f"Skipped: {t['skipped']}", ""]
        else:
            lines += table(["model / dtype", "token agreement", "max logprob err", "ok"],
                           [[name, r["token_agreement"], r["max_logprob_err"], r["ok"]]
                            for name, r in t["tensor_parallel"].items()])
    if parts["attention"]:
        a = parts["attention"]
        lines += [f"## Decode attention bandwidth ({a['shape']}); measured copy bandwidth "
                  f"{a['copy_bandwidth_gb_s']:.0f} GB/s", ""]
        lines += table(["batch", "ctx", "KV MiB", "splits", "ours us", "ours GB/s",
                        "ours / copy bw", "SDPA (contiguous) us", "SDPA / copy bw",
                        "gather + SDPA us"],
                       [[r["batch"], r["ctx"], r["kv_mib"], r["num_kv_splits"], r["ours_us"],
                         r["ours_gb_s"], r["ours_frac_of_copy_bw"], r["sdpa_contiguous_us"],
                         r["sdpa_contiguous_frac_of_copy_bw"], r["gather_plus_sdpa_us"]]
                        for r in a["attention"]])
    if parts["fused"]:
        lines += ["## Fused ops vs PyTorch ops (bf16, us per call)", ""]
        lines += table(["tokens", "add+RMSNorm torch", "fused", "bitwise equal", "rotary torch",
                        "rotary fused", "rotary max err"],
                       [[r["tokens"], r["add_rms_norm_torch_us"], r["add_rms_norm_fused_us"],
                         r["add_rms_norm_bitwise_equal"], r["rotary_torch_us"],
                         r["rotary_fused_us"], r["rotary_max_abs_err"]]
                        for r in parts["fused"]["fused"]])
    for name in ("e2e_qwen3", "e2e_llama", "e2e_qwen3_sync"):
        e = parts[name]
        if not e:
            continue
        ours, hf = e["pagedserve"], e.get("hf_transformers")
        lines += [f"## End-to-end offline throughput: {e['model']} (async scheduling "
                  f"{'on' if ours.get('async_scheduling') else 'off'})", "",
                  f"Command: `{e['command']}`; workload: {e['workload']}", ""]
        rows = [["pagedserve", ours["output_tok_s"], ours["elapsed_s"], ours["peak_gpu_mem_gib"]]]
        if hf:
            rows.append(["HF transformers generate", hf["output_tok_s"], hf["elapsed_s"],
                         hf["peak_gpu_mem_gib"]])
        lines += table(["engine", "output tok/s", "elapsed s", "peak GPU GiB"], rows)
        if hf:
            lines += [f"**Ratio: {e['ratio']:.1f}x** HF transformers.", ""]
        lines += ["Decode-only steps against the bandwidth floor (weights + KV context read "
                  "once per step at the measured copy bandwidth):", ""]
        lines += table(["batch", "steps", "mean batch", "mean KV tokens", "step ms", "floor ms",
                        "floor / step"],
                       [[key, s["steps"], s["mean_batch"], s["mean_kv_tokens"], s["mean_step_ms"],
                         s["floor_ms"], s["floor_fraction"]]
                        for key, s in sorted(e["decode_steps_vs_floor"].items())])
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "device_check.json").write_text(json.dumps(parts, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
