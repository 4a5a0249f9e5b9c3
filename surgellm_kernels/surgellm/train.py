"""The training command::

    python -m surgellm_kernels.train --encoder NAME_OR_PATH --train FILE.jsonl \\
        [--eval FILE.jsonl] --output DIR [--epochs 3] [--max-steps N] [--batch-size 16]
        [--lr 5e-5] [--seed 0] [--kernels fused|reference] [--no-iwn] [--no-gate]
        [--no-prefix] [--max-length 128] [--lexicon VOCAB.json]

Reads and checks the data (training and evaluation files, before the
encoder is loaded), builds a ``SurgeLLMModel`` on the encoder with one head
per task of the training data, fits the IWN statistics on the training
split, trains with AdamW, evaluates (on ``--eval``, else on the training
data) and writes ``DIR/metrics.json`` and the model (``save_pretrained``).
Bad data or arguments print ``error: <message>`` and exit with code 2.
"""
from __future__ import annotations

import math
import os
import random
import sys
import time
from typing import Optional, Sequence

import torch

from ._cli import (ArgumentParser, UsageError, fail, patch_for_kernels, positive_float,
                   positive_int, resolve_device, write_json)
from .data import DataError, LabelSpace, prepare_all, read_examples, select_rows
from .evaluate import evaluate_model, format_metrics
from .features import LexicalFeaturizer

__all__ = ["main", "build_parser"]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m surgellm_kernels.train",
                            description="Train a SurgeLLMModel on JSON-lines data.")
    parser.add_argument("--encoder", required=True,
                        help="transformers encoder: a model name or a local directory")
    parser.add_argument("--train", required=True, help="JSON-lines file: text, task, label")
    parser.add_argument("--eval", help="JSON-lines file to evaluate on (default: --train)")
    parser.add_argument("--output", required=True, help="directory for the model and metrics")
    parser.add_argument("--epochs", type=positive_int, default=3)
    parser.add_argument("--max-steps", type=positive_int, default=None,
                        help="stop after this many optimizer steps, even mid-epoch")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--lr", type=positive_float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kernels", choices=("fused", "reference"), default="fused",
                        help="fused: patch_model (the default); reference: PyTorch modules")
    parser.add_argument("--no-iwn", action="store_true", help="ablation: no IWN")
    parser.add_argument("--no-gate", action="store_true", help="ablation: no surgical gate")
    parser.add_argument("--no-prefix", action="store_true", help="ablation: no task prefix")
    parser.add_argument("--max-length", type=positive_int, default=128,
                        help="tokens per input, the prefix included")
    parser.add_argument("--lexicon", default=None,
                        help="word lists for the lexical features: a JSON file from "
                             "python -m surgellm_kernels.vocabulary (default: the paper's)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    start = time.perf_counter()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if os.path.exists(args.output) and not os.path.isdir(args.output):
            raise UsageError(f"--output {args.output} exists and is not a directory")
        device = resolve_device(args.device)
    except UsageError as exc:
        return fail(str(exc), parser)

    # -- data, checked before the encoder is loaded ---------------------------------------
    try:
        train_examples = read_examples(args.train)
        eval_examples = read_examples(args.eval) if args.eval else None
        space = LabelSpace.from_examples(train_examples, args.train)
        train_encoded = space.encode(train_examples, args.train)
        eval_encoded = space.encode(eval_examples, args.eval) if args.eval else None
    except DataError as exc:
        return fail(str(exc))
    lexicon = None
    if args.lexicon:
        try:
            with open(args.lexicon, encoding="utf-8") as f:
                lexicon = LexicalFeaturizer.from_json(f.read())
        except (OSError, ValueError, TypeError) as exc:
            return fail(f"--lexicon {args.lexicon}: {exc}")
    print(f"train: {args.train}: {len(train_examples)} examples; tasks: "
          + ", ".join(f"{t} ({len(c)} classes)" for t, c in space.classes.items()))
    if args.eval:
        print(f"eval: {args.eval}: {len(eval_examples)} examples")

    # -- the model --------------------------------------------------------------------------
    from tqdm.auto import tqdm

    from .model import SurgeLLMModel

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    texts = [ex.text for ex in train_examples]
    tasks = [task for task, _ in train_encoded]
    labels = [label for _, label in train_encoded]
    try:
        model = SurgeLLMModel.from_encoder(
            args.encoder, space.class_names(), iwn=not args.no_iwn, gate=not args.no_gate,
            prefix=not args.no_prefix, max_length=args.max_length, lexicon=lexicon)
        train_data = prepare_all(model, texts, tasks, labels)  # tokenized once
    except OSError as exc:
        return fail(f"cannot load the encoder {args.encoder!r}: {exc}")
    except ValueError as exc:  # e.g. a max_length too short for the prefix
        return fail(str(exc))
    model.to(device)
    print(f"model: {args.encoder}, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"iwn={model.config.iwn} gate={model.config.gate} prefix={model.config.prefix} "
          f"max_length={model.config.max_length}, "
          f"{model.featurizer.num_features} lexical features, device {device}")
    patch_for_kernels(model, args.kernels)

    n, batch_size = len(texts), args.batch_size
    if model.iwn is not None:
        model.fit_statistics(select_rows(train_data, torch.arange(i, min(i + batch_size, n)))
                             for i in range(0, n, batch_size))

    # -- training ---------------------------------------------------------------------------
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    step, seen, train_start = 0, 0, time.perf_counter()
    with tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True) as bar:
        while step < total_steps:
            order = torch.randperm(n, generator=generator)
            for i in range(0, n, batch_size):
                if step >= total_steps:
                    break
                batch = select_rows(train_data, order[i:i + batch_size], device)
                optimizer.zero_grad(set_to_none=True)
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                step += 1
                seen += batch["labels"].shape[0]
                elapsed = time.perf_counter() - train_start
                bar.set_postfix({"loss": f"{loss.item():.4f}",
                                 "examples/s": f"{seen / max(elapsed, 1e-9):.1f}"})
                bar.update()
    train_time = time.perf_counter() - train_start
    print(f"trained {step} steps ({seen} examples, {seen / n:.2f} epochs) in {train_time:.1f}s, "
          f"{seen / max(train_time, 1e-9):.1f} examples/s")

    # -- evaluation and saving --------------------------------------------------------------
    if args.eval:
        where, examples, encoded = args.eval, eval_examples, eval_encoded
        print(f"evaluating on {args.eval} ({len(examples)} examples)")
    else:
        where, examples, encoded = args.train, train_examples, train_encoded
        print(f"evaluating on the training data {args.train} ({len(examples)} examples; "
              f"no --eval given)")
    metrics = evaluate_model(model, [(ex.text, task, label) for ex, (task, label)
                                     in zip(examples, encoded)], batch_size)
    try:
        model.save_pretrained(args.output)
        write_json(os.path.join(args.output, "metrics.json"), metrics)
    except OSError as exc:
        return fail(f"cannot write to {args.output}: {exc}")
    print(f"metrics on {where}:")
    print(format_metrics(metrics))
    print(f"saved the model and metrics.json to {args.output}")
    print(f"total time {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
