#!/usr/bin/env bash
# Alternates vibee builds and llama-bench on the same GGUF files, file by file, for ROUNDS
# rounds, so that every ratio comes from runs minutes apart (the host's bandwidth drifts).
#
#   ROUNDS=2 VIBEE="/tmp/vibee-old /tmp/vibee-new" LLAMA_BENCH=/path/llama-bench \
#     benches/alternate.sh tinyllama-F16.gguf tinyllama-Q8_0.gguf ...
#
# PROMPT, GEN and REPEAT set the shape (default 128, 32, 2); THREADS the threads (2).
set -euo pipefail
: "${VIBEE:?set VIBEE to one or more vibee binaries}" "${LLAMA_BENCH:?set LLAMA_BENCH}"
ROUNDS=${ROUNDS:-2} PROMPT=${PROMPT:-128} GEN=${GEN:-32} REPEAT=${REPEAT:-2} THREADS=${THREADS:-2}
for round in $(seq "$ROUNDS"); do
  for file in "$@"; do
    for vibee in $VIBEE; do
      echo -n "round $round $(basename "$vibee") $(basename "$file"): "
      "$vibee" bench --model "$file" --threads "$THREADS" --prompt-tokens "$PROMPT" \
        --gen-tokens "$GEN" --repeat "$REPEAT" --concurrency 1 | tail -1
    done
    echo -n "round $round llama.cpp $(basename "$file"): "
    "$LLAMA_BENCH" -m "$file" -t "$THREADS" -p "$PROMPT" -n "$GEN" -r "$REPEAT" -o csv 2>/dev/null |
      awk -F, 'NR > 1 { gsub(/"/, ""); printf "%s %.1f tok/s  ", ($(NF-7) > 0 ? "prefill" : "decode"), $(NF-1) }
        END { print "" }'
  done
done
