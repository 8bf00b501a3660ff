#!/usr/bin/env python3
"""Side-by-side decode/prefill benchmark: vibee vs PyTorch eager on the same weights and threads.

    cargo build --release -p vibee-cli
    python3 benches/make_bench_model.py --dtype float32  --out benches/models/tinyllama-f32
    python3 benches/make_bench_model.py --dtype bfloat16 --out benches/models/tinyllama-bf16
    python3 benches/compare.py --threads 2 \
        --model float32=benches/models/tinyllama-f32 --model bfloat16=benches/models/tinyllama-bf16

For each model it runs `vibee bench --json` and `benches/torch_bench.py --json` one after the
other (never concurrently) and prints a Markdown table: prefill and decode tokens/s of both, the
vibee/PyTorch decode ratio, and each engine's decode speed as a fraction of the memory-bandwidth
bound: STREAM-like copy bandwidth (read+write bytes/s) divided by the weight bytes one decode
step reads. This machine's bandwidth drifts by tens of percent over minutes (shared host), so
the copy is measured right before and right after each engine's run and the higher of the two
is used: the bound is never understated.
"""

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_bench import copy_bandwidth  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run_json(cmd):
    print("$ " + " ".join(cmd), file=sys.stderr)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", required=True, help="DTYPE=DIR (float32 or bfloat16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--vibee", default=os.path.join(ROOT, "target", "release", "vibee"))
    args = ap.parse_args()

    def copy_bw():
        return copy_bandwidth(1.0, args.threads)[0]

    rows = []
    for spec in args.model:
        dtype, model = spec.split("=", 1)
        before = copy_bw()
        vibee = run_json([
            args.vibee, "bench", "--model", model, "--threads", str(args.threads),
            "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens), "--json",
        ])
        between = copy_bw()
        torch = run_json([
            sys.executable, os.path.join(HERE, "torch_bench.py"), "--model", model, "--dtype", dtype,
            "--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
            "--gen-tokens", str(args.gen_tokens), "--copy-gib", "0", "--json",
        ])
        after = copy_bw()
        bytes_per_token = vibee["weight_bytes"]
        rows.append((dtype, vibee, torch, max(before, between) / bytes_per_token, max(between, after) / bytes_per_token,
                     (before, between, after)))

    print(f"\n{args.threads} threads, {args.prompt_tokens}-token prompt, {args.gen_tokens} generated tokens\n")
    print("| weights | engine | prefill tok/s | decode tok/s | first token s | decode vs PyTorch | decode / bandwidth bound |")
    print("|---|---|---|---|---|---|---|")
    for dtype, vibee, torch, vibee_bound, torch_bound, _ in rows:
        ratio = vibee["decode_tokens_per_s"] / torch["decode_tokens_per_s"]
        print(f"| {dtype} | vibee | {vibee['prefill_tokens_per_s']:.1f} | {vibee['decode_tokens_per_s']:.2f} | "
              f"{vibee['time_to_first_token_s']:.2f} | {ratio:.2f}× | {vibee['decode_tokens_per_s'] / vibee_bound:.0%} |")
        print(f"| {dtype} | PyTorch {torch['torch_version']} eager | {torch['prefill_tokens_per_s']:.1f} | "
              f"{torch['decode_tokens_per_s']:.2f} | {torch['ttft_s']:.2f} | 1.00× | "
              f"{torch['decode_tokens_per_s'] / torch_bound:.0%} |")
    print()
    for dtype, vibee, torch, vibee_bound, torch_bound, copies in rows:
        measured = ", ".join(f"{c / 1e9:.1f}" for c in copies)
        print(f"- {dtype}: {vibee['weight_bytes'] / 1e9:.2f} GB read per decode token; copy bandwidth before vibee, "
              f"between, after PyTorch: {measured} GB/s (read+write, {args.threads} threads) → bound "
              f"{vibee_bound:.2f} tok/s for vibee, {torch_bound:.2f} for PyTorch")


if __name__ == "__main__":
    main()
