"""Each part of SURGELLM against the plain fine-tune, on JSON-lines data:

    .venv/bin/python scripts/ablations.py --encoder DIR --train TRAIN.jsonl \\
        --eval EVAL.jsonl [--seeds 0 1 2] [--out runs/ablations] [any training option]

Trains, with the training command's defaults (the paper's recipe) and the
options given, the full model, the model without each part (--no-prefix,
--no-gate, --no-iwn), the model with all three off, and a plain fine-tune of
the same encoder (first token -> one linear layer per task, AdamW with the
same learning rates, warm-up and linear decay, the same epochs and batches,
the best epoch on --eval kept, as for the other variants),
once per seed; prints a markdown table of the mean macro-F1 over tasks (and
per task) on --eval, each cell the mean over seeds with the range.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "full model": [],
    "no prefix": ["--no-prefix"],
    "no gate": ["--no-gate"],
    "no IWN": ["--no-iwn"],
    "all three off": ["--no-prefix", "--no-gate", "--no-iwn"],
}


def plain_fine_tune(encoder, train, eval_path, output, seed, extra):
    """The baseline, in-process: the same data, batches and recipe as the
    training command, the encoder's first token and a linear layer per task."""
    import torch
    from torch import nn
    from transformers import AutoModel, AutoTokenizer, DataCollatorWithPadding
    from transformers.modeling_outputs import SequenceClassifierOutput

    from surgellm_kernels.surgellm.data import LabelSpace, load_examples
    from surgellm_kernels.surgellm.train import parse
    from surgellm_kernels.surgellm.trainer import SurgeLLMTrainer, compute_metrics_for, task_metrics

    options, args = parse(
        [
            "--encoder",
            encoder,
            "--train",
            train,
            "--output",
            output,
            "--seed",
            str(seed),
            "--save-total-limit",
            "1",
            "--disable-tqdm",
            "true",
            *extra,
        ]
    )
    rows, eval_rows = load_examples(train), load_examples(eval_path)
    space = LabelSpace.from_examples(rows, train)
    tasks = space.tasks
    tokenizer = AutoTokenizer.from_pretrained(encoder)

    def encode(data, path):
        labels = space.encode(data, path)
        return data.map(
            lambda b, idx: {
                **tokenizer(b["text"], truncation=True, max_length=options.max_length),
                "labels": [labels[i] for i in idx],
                "task_ids": [tasks.index(t) for t in b["task"]],
            },
            batched=True,
            with_indices=True,
            remove_columns=data.column_names,
        )

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = AutoModel.from_pretrained(encoder)
            d = self.encoder.config.hidden_size
            self.heads = nn.ModuleList(nn.Linear(d, len(space.classes[t])) for t in tasks)

        def forward(self, input_ids, attention_mask, task_ids, labels=None, token_type_ids=None):
            h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[
                :, 0
            ]
            width = max(len(c) for c in space.classes.values())
            logits = torch.stack(
                [
                    nn.functional.pad(head(h), (0, width - head.out_features), value=float("-inf"))
                    for head in self.heads
                ]
            )
            logits = logits[task_ids, torch.arange(len(h))]
            loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
            return SequenceClassifierOutput(loss=loss, logits=logits)

    torch.manual_seed(seed)
    data, eval_data = encode(rows, train), encode(eval_rows, eval_path)
    trainer = SurgeLLMTrainer(
        model=Plain(),
        args=args,
        train_dataset=data,
        eval_dataset=eval_data,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics_for(tasks),
    )
    trainer.train()
    prediction = trainer.predict(eval_data)
    labels, task_ids = prediction.label_ids
    return task_metrics(prediction.predictions.argmax(-1), labels, task_ids, tasks)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "ablations"))
    parser.add_argument(
        "--only",
        nargs="+",
        choices=[*VARIANTS, "plain fine-tune"],
        help="variants to run (default: all, and plain)",
    )
    args, extra = parser.parse_known_args()
    results = {}
    names = args.only or [*VARIANTS, "plain fine-tune"]
    outputs = {
        (name, seed): os.path.join(args.out, name.replace(" ", "-"), f"seed{seed}")
        for name in names
        for seed in args.seeds
    }
    used = [path for path in outputs.values() if os.path.isdir(path) and os.listdir(path)]
    if used:  # the training command refuses to train into another run
        parser.error(f"--out holds runs already ({used[0]}, ...): give a new --out")
    for name in names:
        for seed in args.seeds:
            output = outputs[name, seed]
            if name == "plain fine-tune":
                metrics = plain_fine_tune(args.encoder, args.train, args.eval, output, seed, extra)
            else:
                command = [
                    sys.executable,
                    "-m",
                    "surgellm_kernels.train",
                    "--encoder",
                    args.encoder,
                    "--train",
                    args.train,
                    "--eval",
                    args.eval,
                    "--output",
                    output,
                    "--seed",
                    str(seed),
                    "--disable-tqdm",
                    "true",
                    "--save-total-limit",
                    "1",
                    *VARIANTS[name],
                    *extra,
                ]
                done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(f"{name}, seed {seed}: {done.stderr[-2000:]}")
                with open(os.path.join(output, "metrics.json")) as f:
                    metrics = json.load(f)
            results.setdefault(name, []).append(metrics)
            print(f"{name}, seed {seed}: mean macro-F1 {metrics['macro_f1']:.4f}", flush=True)
    tasks = list(results[names[0]][0]["tasks"])

    def cell(values):
        mean = statistics.mean(values)
        return (
            f"{mean:.3f} ({min(values):.3f}-{max(values):.3f})"
            if len(values) > 1
            else f"{mean:.3f}"
        )

    print(f"\n| variant | mean macro-F1 | {' | '.join(tasks)} |")
    print("|---|---|" + "---|" * len(tasks))
    for name, runs in results.items():
        per_task = [cell([r["tasks"][t]["macro_f1"] for r in runs]) for t in tasks]
        print(f"| {name} | {cell([r['macro_f1'] for r in runs])} | {' | '.join(per_task)} |")


if __name__ == "__main__":
    main()
