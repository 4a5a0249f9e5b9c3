"""Evaluation: macro-F1 and accuracy per task, and the evaluation command::

    python -m surgellm_kernels.evaluate --model DIR --data FILE.jsonl \\
        [--batch-size N] [--output metrics.json] [--kernels fused|reference]

``DIR`` is what ``SurgeLLMModel.save_pretrained`` wrote (e.g. by
``python -m surgellm_kernels.train``); the labels of ``FILE.jsonl`` are
mapped through the saved model's class names. The metrics are
``{"macro_f1": <mean over tasks>, "tasks": {<task>: {"macro_f1", "accuracy", "n"}}}``,
over the tasks present in the data.
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import torch

from ._cli import (ArgumentParser, UsageError, fail, patch_for_kernels, positive_int,
                   resolve_device, write_json)
from .data import DataError, LabelSpace, prepare_batches, read_examples

__all__ = ["macro_f1", "accuracy", "evaluate_model", "format_metrics", "main"]


# -- metrics --------------------------------------------------------------------------------
def _check_pair(y_true: Sequence, y_pred: Sequence) -> None:
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true and y_pred must have one length, got {len(y_true)} and "
                         f"{len(y_pred)}")
    if not len(y_true):
        raise ValueError("y_true and y_pred are empty")


def macro_f1(y_true: Sequence[Hashable], y_pred: Sequence[Hashable]) -> float:
    """F1 per class, averaged over the classes that occur in ``y_true`` or
    ``y_pred`` (scikit-learn's ``f1_score(average="macro")``): a class with
    neither true nor predicted rows does not count, one never predicted
    counts 0."""
    _check_pair(y_true, y_pred)
    tp, fp, fn = Counter(), Counter(), Counter()
    for t, p in zip(y_true, y_pred):
        if t == p:
            tp[t] += 1
        else:
            fn[t] += 1
            fp[p] += 1
    classes = set(y_true) | set(y_pred)
    # F1 = 2PR / (P + R) = 2tp / (2tp + fp + fn); 0 where tp = 0
    return sum(2 * tp[c] / (2 * tp[c] + fp[c] + fn[c]) for c in classes) / len(classes)


def accuracy(y_true: Sequence[Hashable], y_pred: Sequence[Hashable]) -> float:
    _check_pair(y_true, y_pred)
    return sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true)


# -- a model on data ------------------------------------------------------------------------
@torch.no_grad()
def evaluate_model(model, examples: Sequence[Tuple[str, str, int]], batch_size: int = 16) -> dict:
    """Metrics of ``model`` on ``examples``, ``(text, task, class index)``
    triples: ``{"macro_f1": <mean over tasks>, "tasks": {<task>: {"macro_f1",
    "accuracy", "n"}}}`` over the tasks present, in the model's task order.
    Runs in eval mode without gradients; the mode is restored after."""
    if not examples:
        raise ValueError("no examples to evaluate")
    texts, tasks, labels = (list(column) for column in zip(*examples))
    device = next(model.parameters()).device
    predictions: List[int] = []
    was_training = model.training
    model.eval()
    try:
        for batch in prepare_batches(model, texts, tasks, batch_size=batch_size, device=device):
            predictions += model(**batch).logits.argmax(-1).tolist()
    finally:
        model.train(was_training)
    per_task: Dict[str, Tuple[List[int], List[int]]] = {}
    for task, label, prediction in zip(tasks, labels, predictions):
        true, pred = per_task.setdefault(task, ([], []))
        true.append(label)
        pred.append(prediction)
    results = {}
    for task in model.config.task_names:
        if task in per_task:
            true, pred = per_task[task]
            results[task] = {"macro_f1": macro_f1(true, pred), "accuracy": accuracy(true, pred),
                             "n": len(true)}
    mean = sum(r["macro_f1"] for r in results.values()) / len(results)
    return {"macro_f1": mean, "tasks": results}


def format_metrics(metrics: dict) -> str:
    """A small table: one row per task, then the mean macro-F1."""
    header = ("task", "n", "accuracy", "macro_f1")
    rows = [(task, str(m["n"]), f"{m['accuracy']:.4f}", f"{m['macro_f1']:.4f}")
            for task, m in metrics["tasks"].items()]
    rows.append(("mean", "", "", f"{metrics['macro_f1']:.4f}"))
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]

    def line(row):
        return "  ".join([row[0].ljust(widths[0])] +
                         [c.rjust(w) for c, w in zip(row[1:], widths[1:])]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule] + [line(r) for r in rows[:-1]] + [rule, line(rows[-1])])


# -- the command ----------------------------------------------------------------------------
def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m surgellm_kernels.evaluate",
                            description="Evaluate a saved SurgeLLMModel on JSON-lines data.")
    parser.add_argument("--model", required=True, help="directory written by save_pretrained")
    parser.add_argument("--data", required=True, help="JSON-lines file: text, task, label")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--output", help="write the metrics to this JSON file")
    parser.add_argument("--kernels", choices=("fused", "reference"), default="fused")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        device = resolve_device(args.device)
    except UsageError as exc:
        return fail(str(exc), parser)
    try:
        examples = read_examples(args.data)
    except DataError as exc:
        return fail(str(exc))
    if not os.path.isdir(args.model):
        return fail(f"--model {args.model}: not a directory")

    from .model import SurgeLLMModel

    try:
        model = SurgeLLMModel.from_pretrained(args.model, device=device)
    except (OSError, ValueError, RuntimeError) as exc:
        return fail(f"cannot load the model from {args.model}: {exc}")
    config = model.config
    names = config.class_names or {t: [str(i) for i in range(n)]
                                   for t, n in config.tasks.items()}
    try:
        encoded = LabelSpace.from_class_names(names).encode(examples, args.data)
    except DataError as exc:
        return fail(str(exc))
    patch_for_kernels(model, args.kernels)
    metrics = evaluate_model(model, [(ex.text, task, label) for ex, (task, label)
                                     in zip(examples, encoded)], args.batch_size)
    print(f"evaluated {args.model} on {args.data} ({len(examples)} examples)")
    print(format_metrics(metrics))
    if args.output:
        try:
            write_json(args.output, metrics)
        except OSError as exc:
            return fail(f"cannot write {args.output}: {exc}")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
