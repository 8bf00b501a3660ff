#!/usr/bin/env python3
"""PyTorch (CPU) baseline for prefill and decode throughput on a local model.

    python3 benches/torch_bench.py --model DIR --prompt-tokens 128 --gen-tokens 64 \
        --threads 2 --dtype bfloat16 --json

What it measures (eager attention, batch 1, torch.no_grad):
  * prefill: one forward pass over a fixed random prompt of --prompt-tokens ids
    (seed 0, ids drawn from [3, vocab)). Best of --prefill-reps (default 3)
    runs. prefill_tokens_per_s = prompt_tokens / best_prefill_s.
  * decode: a separate run. A prefill with use_cache=True and an argmax gives
    the first new token; ttft_s is the time up to that point. Then a manual
    greedy loop of (gen_tokens - 1) steps of
    model(last_token, past_key_values=cache, use_cache=True) produces the other
    gen_tokens - 1 tokens. The keyword is `cache=` on transformers versions
    that renamed it. decode_tokens_per_s = decode_steps / decode_s, which
    leaves the prefill out.
  * memory bandwidth: a STREAM-like copy with numpy (np.copyto) of a
    --copy-gib (default 1) GiB float64 array, split into --threads chunks
    copied in parallel threads (numpy releases the GIL while copying). Best of
    5. copy_bytes_per_s counts bytes read plus bytes written (2 * array size).
    The single-threaded figure is reported too.
  * weight_bytes: bytes of the model's parameters in the loaded dtype (tied
    parameters counted once). decode_roofline_tokens_per_s =
    copy_bytes_per_s / weight_bytes: an upper bound on decode speed if every
    step has to read all the weights once.
"""

import argparse
import json
import os
import sys
import threading
import time


def copy_bandwidth(gib, threads, reps=5):
    import numpy as np

    n = int(gib * (1 << 30)) // 8
    a = np.full(n, 1.5, dtype=np.float64)
    b = np.zeros(n, dtype=np.float64)  # zeros() may map lazily; touch it:
    b[:] = 0.0
    bounds = [(i * n) // threads for i in range(threads + 1)]

    def run(nt):
        if nt == 1:
            t0 = time.perf_counter()
            np.copyto(b, a)
            return time.perf_counter() - t0
        ths = [
            threading.Thread(target=np.copyto, args=(b[bounds[i]:bounds[i + 1]], a[bounds[i]:bounds[i + 1]]))
            for i in range(nt)
        ]
        t0 = time.perf_counter()
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        return time.perf_counter() - t0

    best_n = min(run(threads) for _ in range(reps))
    best_1 = best_n if threads == 1 else min(run(1) for _ in range(reps))
    nbytes = a.nbytes
    del a, b
    return 2 * nbytes / best_n, 2 * nbytes / best_1, nbytes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--prefill-reps", type=int, default=3)
    ap.add_argument("--copy-gib", type=float, default=1.0, help="copy-bandwidth array size in GiB (0 to skip)")
    ap.add_argument("--json", action="store_true", help="print one JSON object only")
    args = ap.parse_args()
    assert args.gen_tokens >= 1 and args.prompt_tokens >= 1

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch
    import transformers
    from transformers import LlamaForCausalLM

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    def log(*a):
        if not args.json:
            print(*a, file=sys.stderr)

    t0 = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="eager")
    model.eval()
    load_s = time.perf_counter() - t0
    cfg = model.config
    params = list(model.parameters())  # de-duplicated (tied weights once)
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    param_count = sum(p.numel() for p in params)
    log(f"loaded {args.model} in {load_s:.2f}s: {param_count} params, {weight_bytes} bytes ({args.dtype})")

    # transformers >= 5.x renames forward(past_key_values=) to forward(cache=).
    import inspect

    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, cfg.vocab_size, (1, args.prompt_tokens), generator=g)

    with torch.no_grad():
        # Prefill: best of N (the first one also warms up).
        prefill_times = []
        for _ in range(args.prefill_reps):
            t0 = time.perf_counter()
            model(prompt, use_cache=False)
            prefill_times.append(time.perf_counter() - t0)
        prefill_s = min(prefill_times)
        log(f"prefill {args.prompt_tokens} tok: {prefill_times} -> {args.prompt_tokens / prefill_s:.2f} tok/s")

        # Decode: prefill with cache -> first token (TTFT), then a manual loop.
        t0 = time.perf_counter()
        out = model(prompt, use_cache=True)
        nxt = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
        ttft_s = time.perf_counter() - t0
        cache = getattr(out, cache_kw)
        generated = [int(nxt)]
        steps = args.gen_tokens - 1
        t1 = time.perf_counter()
        for _ in range(steps):
            out = model(nxt, use_cache=True, **{cache_kw: cache})
            cache = getattr(out, cache_kw)
            nxt = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
            generated.append(int(nxt))
        decode_s = time.perf_counter() - t1
    decode_tps = steps / decode_s if steps > 0 else None
    log(f"ttft {ttft_s:.4f}s; decode {steps} steps in {decode_s:.3f}s -> {decode_tps} tok/s")

    del model, params, out, cache
    if args.copy_gib > 0:
        bw, bw1, copy_bytes = copy_bandwidth(args.copy_gib, args.threads)
        log(f"copy bandwidth (read+write): {bw / 1e9:.2f} GB/s with {args.threads} threads, {bw1 / 1e9:.2f} GB/s with 1")
    else:
        bw = bw1 = copy_bytes = None

    result = {
        "model": os.path.abspath(args.model),
        "dtype": args.dtype,
        "threads": args.threads,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "load_s": load_s,
        "prefill_s": prefill_s,
        "prefill_times_s": prefill_times,
        "prefill_tokens_per_s": args.prompt_tokens / prefill_s,
        "ttft_s": ttft_s,
        "decode_steps": steps,
        "decode_s": decode_s,
        "decode_tokens_per_s": decode_tps,
        "generated_ids": generated,
        "param_count": param_count,
        "weight_bytes": weight_bytes,
        "copy_array_bytes": copy_bytes,
        "copy_bytes_per_s": bw,
        "copy_bytes_per_s_1thread": bw1,
        "decode_roofline_tokens_per_s": (bw / weight_bytes) if bw else None,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
