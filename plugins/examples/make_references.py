#!/usr/bin/env python3
"""Reference outputs for the example plugins' conformance cases, from independent code.

    python3 plugins/examples/make_references.py

- no-repeat-ngram: Hugging Face transformers' NoRepeatNGramLogitsProcessor on random token
  histories (with repeats) and random scores, for several n.
- typical-sampler: transformers' TemperatureLogitsWarper then TypicalLogitsWarper on fixed
  random logits: the next-token distribution each (temperature, mass) leaves.
- chrf: sacreBLEU's sentence-level chrF.
- regex-deny: Python's `re` module run over each whole text with the same rules, as one
  leftmost-first alternation: redact rules replaced by [REDACTED], flag rules kept and
  reported, the first stop rule ends the text before its match.

Banned scores (-inf) are written as null. CI never runs this script.
"""

import json
import os
import random
import re

import torch
import transformers
from transformers.generation.logits_process import (
    NoRepeatNGramLogitsProcessor,
    TemperatureLogitsWarper,
    TypicalLogitsWarper,
)

HERE = os.path.dirname(os.path.abspath(__file__))


def write(path, value):
    with open(os.path.join(HERE, path), "w") as f:
        json.dump(value, f, indent=1)
        f.write("\n")


def no_repeat_ngram():
    rng = random.Random(7)
    torch.manual_seed(7)
    vocab = 50
    cases = []
    for n in [1, 2, 3, 4]:
        for length in [1, 2, 3, 12, 40]:
            # A small alphabet makes repeated n-grams likely.
            ids = [rng.randrange(6) for _ in range(length)]
            scores = torch.randn(1, vocab)
            out = NoRepeatNGramLogitsProcessor(n)(torch.tensor([ids]), scores.clone())[0]
            cases.append(
                dict(
                    config=str(n),
                    input_ids=ids,
                    scores=scores[0].tolist(),
                    expected=[None if v == float("-inf") else v for v in out.tolist()],
                )
            )
    write(
        "no-repeat-ngram/reference.json",
        dict(transformers=transformers.__version__, torch=torch.__version__, cases=cases),
    )


def deny(rules, text):
    """What regex-deny should release for `text`, computed with Python's re."""
    patterns = [p for _, p in rules]
    combined = re.compile("|".join(f"(?P<r{i}>{p})" for i, p in enumerate(patterns)))
    out, done, flagged = "", 0, False
    for m in combined.finditer(text):
        i = next(i for i in range(len(rules)) if m.group(f"r{i}") is not None)
        action = rules[i][0]
        out += text[done : m.start()]
        if action == "stop":
            return out, flagged, True
        if action == "redact":
            out += "[REDACTED]"
        else:
            out += m.group(0)
            flagged = True
        done = m.end()
    return out + text[done:], flagged, False


def regex_deny():
    ssn = ("redact", r"\b\d{3}-\d{2}-\d{4}\b")
    email = ("redact", r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[a-z]{2,}")
    password = ("flag", r"(?i:password)")
    rmrf = ("stop", r"rm -rf /")
    texts = [
        "My number is 123-45-6789, call me.",
        "Numbers 123-45-6789 and 987-65-4321 and 12-345-6789 (not one).",
        "Write to jane.doe@example.com or bob@mail.example.org today.",
        "Nothing to see here, just ordinary text about llamas.",
        "The PASSWORD is hunter2; my password manager knows it.",
        "Sure! First run rm -rf / and then 123-45-6789 is gone.",
        "Ends with a match 555-12-3456",
        "Ünïcödé text with é and 漢字 around 123-45-6789 ✓ and x@y.com",
    ]
    configs = [
        [ssn],
        [ssn, email],
        [ssn, email, password],
        [ssn, password, rmrf],
    ]
    cases = []
    for rules in configs:
        config = "\n".join(f"{a} {p}" for a, p in rules)
        for text in texts:
            released, flagged, stopped = deny(rules, text)
            cases.append(
                dict(config=config, text=text, released=released, flagged=flagged, stopped=stopped)
            )
    write("regex-deny/reference.json", dict(python_re=re.__name__, cases=cases))


def typical_sampler():
    torch.manual_seed(11)
    logits = (torch.randn(1, 24) * 2.0)
    cases = []
    for temperature, mass in [(1.0, 0.9), (1.0, 0.5), (0.7, 0.95), (1.3, 0.2), (1.0, 0.999)]:
        scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
        scores = TypicalLogitsWarper(mass)(None, scores)
        probs = torch.softmax(scores, dim=-1)[0]
        cases.append(
            dict(
                params=dict(temperature=temperature),
                configs={"typical-sampler": str(mass)},
                probs=probs.tolist(),
            )
        )
    write(
        "typical-sampler/reference.json",
        dict(
            transformers=transformers.__version__,
            logits=logits[0].tolist(),
            history=[],
            cases=cases,
        ),
    )


def chrf():
    import sacrebleu

    pairs = [
        ("The cat sat on the mat.", "The cat sat on the mat."),
        ("The cat sat on the mat.", "A cat was sitting on the mat."),
        ("the quick brown fox", "The quick brown dog jumps"),
        ("Ünïcödé 漢字 text", "Unicode 漢字 texts"),
        ("", "nothing predicted"),
        ("completely different", "xyz"),
        ("a", "a"),
        ("llamas graze in the high Andes", "Llamas graze high in the Andes mountains"),
    ]
    cases = [
        dict(config="", prediction=h, reference=r, score=sacrebleu.sentence_chrf(h, [r]).score)
        for h, r in pairs
    ]
    write("chrf/reference.json", dict(sacrebleu=sacrebleu.__version__, cases=cases))


if __name__ == "__main__":
    typical_sampler()
    chrf()
    no_repeat_ngram()
    regex_deny()
