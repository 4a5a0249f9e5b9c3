"""The evaluation command::

    python -m surgellm_kernels.evaluate --model DIR --data FILE.jsonl \\
        [--batch-size N] [--output metrics.json] [--kernels fused|reference]

``DIR`` is a saved SURGELLM model (``python -m surgellm_kernels.train``
writes one); the labels of ``FILE.jsonl`` are mapped through its class
names. Prints, and with ``--output`` writes, what the training command
writes to ``metrics.json``:
``{"macro_f1": <mean over tasks>, "tasks": {<task>: {"macro_f1", "accuracy", "n"}}}``,
over the tasks present in the data (scikit-learn's metrics).
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Optional, Sequence

from ._cli import ArgumentParser, UsageError, fail, patch_for_kernels, positive_int, say, write_json

__all__ = ["format_metrics", "main"]


def format_metrics(metrics: dict) -> str:
    """A small table: one row per task, then the mean macro-F1."""
    header = ("task", "n", "accuracy", "macro_f1")
    rows = [
        (task, str(m["n"]), f"{m['accuracy']:.4f}", f"{m['macro_f1']:.4f}")
        for task, m in metrics["tasks"].items()
    ]
    rows.append(("mean", "", "", f"{metrics['macro_f1']:.4f}"))
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]

    def line(row):
        return "  ".join(
            [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule] + [line(r) for r in rows[:-1]] + [rule, line(rows[-1])])


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m surgellm_kernels.evaluate",
        description="Evaluate a saved SURGELLM model on JSON-lines data.",
    )
    parser.add_argument("--model", required=True, help="directory written by save_pretrained")
    parser.add_argument("--data", required=True, help="JSON-lines file: text, task, label")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--output", help="write the metrics to this JSON file")
    parser.add_argument("--kernels", choices=("fused", "reference"), default="fused")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .data import DataError, LabelSpace, load_examples

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        return fail(str(exc), parser)
    try:
        rows = load_examples(args.data)
    except DataError as exc:
        return fail(str(exc))
    if not os.path.isdir(args.model):
        return fail(f"--model {args.model}: not a directory")

    from transformers import (
        AutoModelForSequenceClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from .processing_surgellm import SurgeLLMProcessor
    from .trainer import accelerator_present, task_metrics

    try:
        processor = SurgeLLMProcessor.from_pretrained(args.model)
    except (OSError, ValueError) as exc:
        return fail(f"cannot load the model from {args.model}: {exc}")
    config = processor.config
    names = config.class_names or {t: [str(i) for i in range(n)] for t, n in config.tasks.items()}
    try:
        labels = LabelSpace(names).encode(rows, args.data)
    except DataError as exc:
        return fail(str(exc))
    try:
        model = AutoModelForSequenceClassification.from_pretrained(args.model)
    except Exception as exc:  # OSError, ValueError, safetensors' error for a damaged file, ...
        return fail(f"cannot load the model from {args.model}: {type(exc).__name__}: {exc}")
    try:
        data = processor.map(rows, labels, args.data)
    except ValueError as exc:  # e.g. a row whose prefix max_seq_length cannot hold
        return fail(str(exc) if isinstance(exc, DataError) else f"{args.data}: {exc}")
    patch_for_kernels(model, args.kernels)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = Trainer(
            model=model,
            data_collator=DataCollatorWithPadding(processor.tokenizer),
            args=TrainingArguments(
                output_dir=scratch,
                report_to="none",
                per_device_eval_batch_size=args.batch_size,
                label_names=["labels", "task_ids"],
                dataloader_pin_memory=accelerator_present(),
            ),
        )
        prediction = trainer.predict(data)
    true, task_ids = prediction.label_ids
    metrics = task_metrics(prediction.predictions.argmax(-1), true, task_ids, config.task_names)
    say(f"evaluated {args.model} on {args.data} ({len(rows)} examples)")
    say(format_metrics(metrics))
    if args.output:
        try:
            write_json(args.output, metrics)
        except OSError as exc:
            return fail(f"cannot write {args.output}: {exc}")
        say(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
