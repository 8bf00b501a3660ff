#!/usr/bin/env python3
"""Side-by-side benchmark of vibee and llama.cpp on the same GGUF files, threads and lengths.

    cargo build --release -p vibee-cli
    python3 benches/make_bench_model.py --dtype float32 --out benches/models/tinyllama-f32
    # convert and quantize with llama.cpp's own tools (see tests/fixtures/make_gguf_models.py
    # for the converter's one adjustment to the fixture tokenizer), then:
    python3 benches/compare_gguf.py --threads 2 --llama-bench PATH/TO/llama-bench \\
        benches/models/tinyllama-Q4_0.gguf benches/models/tinyllama-Q8_0.gguf ...

For each file it runs `llama-bench -o json` and `vibee bench --json` one after the other (never
concurrently); `--vibee-only MODEL[:PLUGINS] …` adds checkpoints only vibee reads (the f32
safetensors with `auto,int8` / `auto,q4`, `vibee quantize` outputs) to the same run, each best of `--repeat` runs of a `--prompt`-token prefill and a `--gen`-token
decode, and prints a Markdown table of prefill and decode tokens/s and vibee/llama.cpp ratios.
"""

import argparse
import json
import os
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
VIBEE = os.path.join(os.path.dirname(HERE), "target", "release", "vibee")


def llama_cpp(binary, model, args):
    out = subprocess.run(
        [binary, "-m", model, "-t", str(args.threads), "-p", str(args.prompt),
         "-n", str(args.gen), "-r", str(args.repeat), "-o", "json"],
        check=True, capture_output=True, text=True,
    ).stdout
    results = json.loads(out)
    prefill = max(max(r["samples_ts"]) for r in results if r["n_prompt"] > 0)
    decode = max(max(r["samples_ts"]) for r in results if r["n_gen"] > 0)
    return prefill, decode


def vibee(model, args, plugins="auto"):
    out = subprocess.run(
        [VIBEE, "bench", "--model", model, "--plugins", plugins, "--threads", str(args.threads),
         "--prompt-tokens", str(args.prompt), "--gen-tokens", str(args.gen),
         "--repeat", str(args.repeat), "--json"],
        check=True, capture_output=True, text=True,
    ).stdout
    result = json.loads(out)
    return result["prefill_tokens_per_s"], result["decode_tokens_per_s"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="+")
    parser.add_argument("--llama-bench", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--gen", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--vibee-only", nargs="*", default=[], metavar="MODEL[:PLUGINS]",
        help="checkpoints llama.cpp cannot read (f32 safetensors with --plugins auto,int8, "
             "AutoAWQ/GPTQ directories), benched by vibee in the same run",
    )
    args = parser.parse_args()
    print("| file | engine | prefill tok/s | decode tok/s | decode vs llama.cpp |")
    print("|---|---|---|---|---|")
    for model in args.models:
        lp, ld = llama_cpp(args.llama_bench, model, args)
        vp, vd = vibee(model, args)
        name = os.path.basename(model)
        print(f"| {name} | vibee | {vp:.1f} | {vd:.2f} | {vd / ld:.2f}x |")
        print(f"| {name} | llama.cpp | {lp:.1f} | {ld:.2f} | 1.00x |")
    for entry in args.vibee_only:
        model, _, plugins = entry.partition(":")
        vp, vd = vibee(model, args, plugins or "auto")
        name = os.path.basename(model.rstrip("/")) + (f" ({plugins})" if plugins else "")
        print(f"| {name} | vibee | {vp:.1f} | {vd:.2f} | - |")


if __name__ == "__main__":
    main()
