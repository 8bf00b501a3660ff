#!/usr/bin/env python3
"""Quality, speed and cost of `vibee quantize`'s methods on one full-precision checkpoint.

    cargo build --release -p vibee-cli
    python3 benches/compare_quantizers.py --model benches/models/tinyllama-f32 \\
        --calib CALIBRATION.txt --eval HELD_OUT.txt --work /tmp/quantized --threads 2

For each method (q4 = round-to-nearest, awq, gptq, gptq --act-order, hqq, int8; `--only
NAME…` picks some) it runs
`vibee quantize` (timed), then `vibee divergence` against the f32 model on the first
`--tokens` tokens of the held-out text and on the spread token ids `vibee bench` uses, then
`vibee bench` for decode tokens/s. One command at a time; prints a Markdown table.
"""

import argparse
import json
import os
import subprocess
import time

HERE = os.path.dirname(os.path.abspath(__file__))
VIBEE = os.path.join(os.path.dirname(HERE), "target", "release", "vibee")

METHODS = [
    ("q4 (round-to-nearest)", ["--method", "q4"]),
    ("awq", ["--method", "awq"]),
    ("gptq", ["--method", "gptq"]),
    ("gptq --act-order", ["--method", "gptq", "--act-order"]),
    ("hqq", ["--method", "hqq"]),
    ("int8", ["--method", "int8"]),
]
CALIBRATED = ("awq", "gptq")


def run(args):
    return subprocess.run([VIBEE] + args, check=True, capture_output=True, text=True).stdout


def divergence(model, args, extra):
    out = run(["divergence", "--model", model, "--reference", args.model, "--threads",
               str(args.threads), "--tokens", str(args.tokens), "--json"] + extra)
    return json.loads(out)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--only", nargs="+", help="method names (as printed) to run")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    print(f"| method | quantize s | KL text | rel. err text | top-1 text | KL ids | "
          f"rel. err ids | decode tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, flags in METHODS:
        if args.only and name not in args.only:
            continue
        out = os.path.join(args.work, name.split()[0] + ("-act" if "--act-order" in flags else ""))
        if not os.path.exists(out):
            started = time.time()
            calib = ["--calib", args.calib] if flags[1] in CALIBRATED else []
            run(["quantize", "--model", args.model, "--out", out, "--group", str(args.group),
                 "--threads", str(args.threads)] + calib + flags)
            seconds = f"{time.time() - started:.0f}"
        else:
            seconds = "(reused)"
        text = divergence(out, args, ["--text", args.eval])
        ids = divergence(out, args, [])
        bench = json.loads(run(["bench", "--model", out, "--threads", str(args.threads),
                                "--prompt-tokens", "16", "--gen-tokens", "32", "--json"]))
        print(f"| {name} | {seconds} | {text['mean_kl']:.3e} | {text['relative_error']:.1%} | "
              f"{text['top1_agreement']:.1%} | {ids['mean_kl']:.3e} | {ids['relative_error']:.1%} | "
              f"{bench['decode_tokens_per_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
