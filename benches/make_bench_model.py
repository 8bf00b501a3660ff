#!/usr/bin/env python3
"""Create a random-weight Llama model with TinyLlama-1.1B's shape for benchmarks.

    python3 benches/make_bench_model.py --dtype bfloat16 --out /tmp/tinyllama-bf16
    python3 benches/make_bench_model.py --dtype float32  --out /tmp/tinyllama-f32

The small models of the fixed-cost rows override the shape:

    python3 benches/make_bench_model.py --out /tmp/small40m --hidden 192 --heads 6 --kv-heads 2 \
        --layers 16 --intermediate 4096
    python3 benches/make_bench_model.py --out /tmp/small2m --hidden 192 --heads 6 --kv-heads 2 \
        --layers 2 --intermediate 512 --vocab 2048

Writes config.json, generation_config.json, sharded safetensors plus
model.safetensors.index.json, and copies the fixture tokenizer
(tests/fixtures/llama-gqa/tokenizer.json and tokenizer_config.json). The
tokenizer's vocabulary (384) does not match the model's (32000); that does not
matter, because the benchmarks feed token ids directly.

The weights are N(0, 0.02) from a torch.Generator seeded with --seed (default
0), drawn tensor by tensor in state-dict order. RMSNorm gains are ones. The
full model is never held in memory: each tensor is made, cast, and written to
its shard in turn.
"""

import argparse
import json
import os
import shutil

import torch
from safetensors.torch import save_file
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE_TOK = os.path.join(HERE, "..", "tests", "fixtures", "llama-gqa")

SHAPE = dict(
    hidden_size=2048,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    intermediate_size=5632,
    vocab_size=32000,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    hidden_act="silu",
    tie_word_embeddings=False,
    initializer_range=0.02,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-bytes", type=int, default=2 * 1024**3, help="max bytes per shard (default 2 GiB)")
    overrides = {
        "layers": "num_hidden_layers",
        "hidden": "hidden_size",
        "intermediate": "intermediate_size",
        "heads": "num_attention_heads",
        "kv_heads": "num_key_value_heads",
        "vocab": "vocab_size",
    }
    for flag, key in overrides.items():
        ap.add_argument("--" + flag.replace("_", "-"), type=int, default=None, help=f"override {key}")
    args = ap.parse_args()

    dtype = getattr(torch, args.dtype)
    shape = dict(SHAPE)
    for flag, key in overrides.items():
        if getattr(args, flag) is not None:
            shape[key] = getattr(args, flag)
    config = LlamaConfig(**shape)
    config.dtype = dtype
    config.architectures = ["LlamaForCausalLM"]

    # Parameter names and shapes, without allocating anything.
    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    entries = [(k, tuple(v.shape)) for k, v in meta.state_dict().items()]
    del meta

    os.makedirs(args.out, exist_ok=True)
    for f in os.listdir(args.out):
        if f.endswith(".safetensors") or f == "model.safetensors.index.json":
            os.remove(os.path.join(args.out, f))

    g = torch.Generator().manual_seed(args.seed)
    std = shape["initializer_range"]
    elt = torch.tensor([], dtype=dtype).element_size()

    # Group tensors into shards (in state-dict order) by size.
    shards, cur, cur_bytes = [], [], 0
    for name, shp in entries:
        n = 1
        for s in shp:
            n *= s
        b = n * elt
        if cur and cur_bytes + b > args.shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shp))
        cur_bytes += b
    if cur:
        shards.append(cur)

    total = 0
    weight_map = {}
    nshards = len(shards)
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if nshards == 1 else f"model-{i + 1:05d}-of-{nshards:05d}.safetensors"
        tensors = {}
        for name, shp in shard:
            if name.endswith("norm.weight"):
                t = torch.ones(shp, dtype=dtype)
            else:
                t = (torch.randn(shp, generator=g) * std).to(dtype)
            tensors[name] = t.contiguous()
            total += t.numel() * t.element_size()
            weight_map[name] = fname
        save_file(tensors, os.path.join(args.out, fname), metadata={"format": "pt"})
        print(f"wrote {fname} ({len(tensors)} tensors)")
        del tensors

    if nshards > 1:
        with open(os.path.join(args.out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
            f.write("\n")

    config.save_pretrained(args.out)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(args.out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(FIXTURE_TOK, f), os.path.join(args.out, f))
    print(f"done: {args.out} ({total / 1e9:.3f} GB of weights, {args.dtype})")


if __name__ == "__main__":
    main()
