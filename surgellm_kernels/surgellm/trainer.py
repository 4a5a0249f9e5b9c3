"""SURGELLM on ``transformers``' ``Trainer``: the paper's recipe as
``TrainingArguments`` defaults, task-homogeneous batches, the IWN statistics
fitted before the first step (a callback), and per-task metrics.

The paper's recipe (each a ``TrainingArguments`` field, changeable): AdamW at
learning rate 2e-5, weight decay 0.01 except biases and LayerNorm weights
(``Trainer``'s default grouping), linear warm-up over 6% of the updates then
linear decay, gradient clipping at 1.0, 3 epochs, evaluation every epoch
keeping the best checkpoint by the mean macro-F1 over tasks.

One addition: the parameters that start at random (heads, gate, feature
projection, task embedding) learn at ``head_learning_rate`` (3e-3), the
pretrained encoder at ``learning_rate``. At 2e-5 a head initialised at
std 0.02 barely moves in the few hundred steps of a small data set (the
model then predicts the class priors); ``head_learning_rate=None`` (or the
``learning_rate`` value) gives every parameter ``learning_rate``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from transformers import Trainer, TrainerCallback, TrainingArguments

from .data import check_metric_task_names

__all__ = [
    "SurgeLLMTrainingArguments",
    "SurgeLLMTrainer",
    "FitIWNStatistics",
    "TaskHomogeneousSampler",
    "task_metrics",
    "compute_metrics_for",
]


def accelerator_present() -> bool:
    """Whether torch sees an accelerator: batches are pinned in host memory
    for it (without one, torch's DataLoader warns that pinning is ignored)."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


@dataclasses.dataclass
class SurgeLLMTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with the paper's recipe as defaults (see the
    module docstring), short aliases (``--epochs``, ``--lr``, ...), and the
    settings SURGELLM's inputs need."""

    output_dir: Optional[str] = dataclasses.field(
        default=None,
        metadata={
            "aliases": ["--output"],
            "required": True,  # on the command line (TrainingArguments would pick one)
            "help": "directory for checkpoints, the model and metrics.json",
        },
    )
    # The recipe's fields, each with a help text: the command's --help shows
    # their defaults.
    learning_rate: float = dataclasses.field(
        default=2e-5,
        metadata={"aliases": ["--lr"], "help": "AdamW learning rate of the pretrained encoder"},
    )
    weight_decay: float = dataclasses.field(
        default=0.01, metadata={"help": "AdamW weight decay, except biases and norm weights"}
    )
    warmup_steps: float = dataclasses.field(
        default=0.06, metadata={"help": "linear warm-up: steps, or a ratio of them in [0, 1)"}
    )
    num_train_epochs: float = dataclasses.field(
        default=3.0, metadata={"aliases": ["--epochs"], "help": "epochs over --train"}
    )
    per_device_train_batch_size: int = dataclasses.field(
        default=16,
        metadata={"aliases": ["--batch-size"], "help": "rows per batch, one task each, per device"},
    )
    eval_strategy: str = dataclasses.field(
        default="epoch", metadata={"help": "when to evaluate on --eval: epoch, steps or no"}
    )
    save_strategy: str = dataclasses.field(
        default="epoch", metadata={"help": "when to save a checkpoint: epoch, steps, best or no"}
    )
    save_total_limit: Optional[int] = dataclasses.field(
        default=2, metadata={"help": "checkpoints kept (the best one among them)"}
    )
    load_best_model_at_end: bool = dataclasses.field(
        default=True, metadata={"help": "end with the best checkpoint's weights"}
    )
    metric_for_best_model: Optional[str] = dataclasses.field(
        default="macro_f1",
        metadata={
            "help": "what the best checkpoint is chosen by: macro_f1 (the mean over tasks), "
            "<task>_macro_f1, <task>_accuracy or loss"
        },
    )
    greater_is_better: Optional[bool] = dataclasses.field(
        default=None,
        metadata={
            "help": "whether a higher --metric-for-best-model is better (default: yes, but "
            "for a loss)"
        },
    )
    logging_steps: float = dataclasses.field(
        default=10, metadata={"help": "log the training loss every this many steps"}
    )
    report_to: Optional[str] = dataclasses.field(
        default="none", metadata={"help": "none, or logging integrations (tensorboard, ...)"}
    )
    seed: int = dataclasses.field(default=0, metadata={"help": "random seed, in [0, 2**32)"})
    label_smoothing_factor: float = dataclasses.field(
        default=0.0, metadata={"help": "not supported: the logits are padded with -inf; keep 0"}
    )
    head_learning_rate: Optional[float] = dataclasses.field(
        default=3e-3,
        metadata={
            "help": "learning rate of the parameters that start at random, outside the "
            "pretrained encoder: heads, gate, feature projection, task embedding "
            "(the --learning-rate value: one rate for all)"
        },
    )
    # task ids are gathered with the labels, for the per-task metrics
    label_names: Optional[List[str]] = dataclasses.field(
        default_factory=lambda: ["labels", "task_ids"]
    )

    def __post_init__(self):
        # The recipe keeps the best checkpoint, which needs both: say how to
        # leave it (TrainingArguments' own error names neither flag).
        for name in ("eval_strategy", "save_strategy"):
            value = getattr(self, name)
            if self.load_best_model_at_end and str(getattr(value, "value", value)) == "no":
                flag = "--" + name.replace("_", "-")
                raise ValueError(
                    f"{flag} no: the best checkpoint (--load-best-model-at-end, on by "
                    f"default) is chosen at each evaluation and saved; pass "
                    f"--load-best-model-at-end false with {flag} no"
                )
        super().__post_init__()


class TaskHomogeneousSampler(Sampler):
    """Row indices in runs of ``batch_size`` that each hold rows of one task
    (the paper's task-homogeneous batches): each task's rows shuffled and
    cut into batches, a task's last batch filled up with its own rows drawn
    again, and the batches shuffled across tasks. Each pass over it is a new
    permutation, the same on every rank (seeded by ``seed`` and the pass);
    ``set_epoch`` (which ``Trainer`` calls each epoch) sets the pass, so a
    run resumed from a checkpoint takes the batches the whole run would."""

    def __init__(self, task_ids: Sequence[int], batch_size: int, seed: int = 0):
        self.batch_size, self.seed, self.passes = batch_size, seed, 0
        tasks = np.asarray(task_ids)
        self.rows = {int(t): np.flatnonzero(tasks == t) for t in np.unique(tasks)}

    def _batches(self, generator: torch.Generator) -> List[np.ndarray]:
        batches = []
        for rows in self.rows.values():
            order = rows[torch.randperm(len(rows), generator=generator).numpy()]
            short = -len(order) % self.batch_size
            if short:
                refill = torch.randint(len(rows), (short,), generator=generator).numpy()
                order = np.concatenate([order, rows[refill]])
            batches += np.split(order, len(order) // self.batch_size)
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def set_epoch(self, epoch: int) -> None:
        self.passes = int(epoch)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.passes)
        self.passes += 1
        for batch in self._batches(generator):
            yield from batch.tolist()

    def __len__(self) -> int:
        return sum(
            -(-len(rows) // self.batch_size) * self.batch_size for rows in self.rows.values()
        )


def check_training_arguments(args) -> None:
    """``ValueError`` for the ``Trainer`` options the model cannot train with."""
    data_seed = getattr(args, "data_seed", None)
    if data_seed is not None and not 0 <= data_seed < 2**32:  # the range --seed takes
        raise ValueError(f"data_seed must be in [0, 2**32), got {data_seed}")
    # _get_train_sampler draws the task-homogeneous batches in Trainer's place
    strategy = getattr(args, "train_sampling_strategy", "random")
    grouped = getattr(args, "group_by_length", False)  # its older form
    if strategy != "random" or grouped:
        shown = (
            "group_by_length" if strategy == "random" else f"train_sampling_strategy={strategy!r}"
        )
        raise ValueError(
            f"{shown} is not supported: each training batch holds one task's rows, drawn at "
            "random (TaskHomogeneousSampler); leave train_sampling_strategy at 'random'"
        )
    smoothing = getattr(args, "label_smoothing_factor", 0)
    if smoothing:
        # Trainer's smoother would take the labels from the model and average
        # log-probabilities over every column of the logits, -inf past each
        # task's classes: an infinite loss, logged as 0.
        raise ValueError(
            f"label_smoothing_factor={smoothing} is not supported: the logits hold every "
            "task's classes, padded with -inf; leave it at 0"
        )


# The Trainer settings compute_metrics_for's per-task metrics need: each
# field's one supported value, and why.
_METRIC_SETTINGS = {
    "prediction_loss_only": (False, "the metrics and the best checkpoint need the predictions"),
    "eval_do_concat_batches": (True, "the metrics take the eval rows' predictions concatenated"),
    "batch_eval_metrics": (
        False,
        "the macro-F1 is of every eval row at once, not a sum over batches",
    ),
    "dataloader_drop_last": (
        False,
        "the metrics score every eval row (the training batches are always full)",
    ),
}


def check_metric_arguments(args) -> None:
    """``ValueError`` for the ``Trainer`` options that would keep eval rows,
    their predictions or their task ids from :func:`compute_metrics_for`'s
    per-task metrics (which the training command computes)."""
    for name, (supported, why) in _METRIC_SETTINGS.items():
        value = getattr(args, name, supported)
        if value != supported:
            raise ValueError(f"{name}={value} is not supported: {why}; leave it at {supported}")
    label_names = getattr(args, "label_names", None)
    if label_names is not None and list(label_names) != ["labels", "task_ids"]:
        raise ValueError(
            f"label_names={list(label_names)} is not supported: the per-task metrics need the "
            "labels and the task ids; leave it at ['labels', 'task_ids']"
        )


class SurgeLLMTrainer(Trainer):
    """``Trainer`` with task-homogeneous training batches: data-parallel,
    every rank's share of a step comes from one global batch of one task
    (each rank takes its consecutive part of the runs the sampler makes), so
    that N ranks of batch B take the steps one process of batch N x B takes."""

    def __init__(self, *args, **kwargs):
        check_training_arguments(kwargs.get("args", args[1] if len(args) > 1 else None))
        super().__init__(*args, **kwargs)
        self.task_sampler: Optional[TaskHomogeneousSampler] = None
        self.add_callback(_SamplerEpoch(self))

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        global_batch = self.args.per_device_train_batch_size * self.args.world_size
        # data_seed orders the data where given, as Trainer's own sampler does
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        self.task_sampler = TaskHomogeneousSampler(_column(dataset, "task_ids"), global_batch, seed)
        return self.task_sampler

    def create_optimizer(self, model=None):
        """``Trainer``'s AdamW groups (weight decay except biases and norms),
        each split in two: the pretrained encoder's parameters (the model's
        ``encoder`` submodule, or its base model's) at ``learning_rate``, the
        others, which start at random, at ``head_learning_rate``; the
        schedule scales both alike. An optimizer given to ``Trainer`` is left
        as it is."""
        head_lr = getattr(self.args, "head_learning_rate", None)
        if head_lr is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        encoder = getattr(getattr(opt_model, "base_model", opt_model), "encoder", None)
        one_rate = None
        if not isinstance(encoder, torch.nn.Module):
            one_rate = "the model has no encoder submodule"
        elif any(kind in str(self.args.optim) for kind in ("layerwise", "lomo")):
            one_rate = f"optim={self.args.optim} makes its own groups"
        elif self.args.deepspeed:
            one_rate = "DeepSpeed makes the optimizer"
        if one_rate:
            warnings.warn(
                f"head_learning_rate is not applied ({one_rate}): every parameter "
                "learns at learning_rate",
                stacklevel=2,
            )
            return super().create_optimizer(model)
        optimizer = super().create_optimizer(model)
        pretrained = {id(p) for p in encoder.parameters()}
        groups, optimizer.param_groups = optimizer.param_groups, []
        for group in groups:
            options = {k: v for k, v in group.items() if k != "params"}
            for params, lr in (
                ([p for p in group["params"] if id(p) in pretrained], group["lr"]),
                ([p for p in group["params"] if id(p) not in pretrained], head_lr),
            ):
                if params:
                    optimizer.add_param_group({**options, "params": params, "lr": lr})
        return optimizer


class _SamplerEpoch(TrainerCallback):
    """Sets the task sampler's pass to the epoch as each begins: data-parallel,
    accelerate wraps the sampler in batch samplers that ``Trainer``'s
    ``set_epoch`` does not reach, and a run resumed within an epoch would
    take the first epoch's order there."""

    def __init__(self, trainer: "SurgeLLMTrainer"):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.trainer.task_sampler is not None:  # state.epoch: 1.5 when resumed mid-epoch
            self.trainer.task_sampler.set_epoch(math.floor((state.epoch or 0) + 1e-6))


class FitIWNStatistics(TrainerCallback):
    """Fits the paper's fixed IWN statistics on the training split before the
    first step: one streamed pass (``InstanceWeightedNorm.partial_fit``), the
    same on every rank (each streams the whole split)."""

    COLUMNS = ("features", "labels", "task_ids")

    def __init__(self, train_dataset, batch_size: int):
        self.rows, self.batch_size = train_dataset, batch_size
        if hasattr(train_dataset, "select_columns"):  # a datasets.Dataset
            self.rows = train_dataset.select_columns(list(self.COLUMNS)).with_format("torch")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and model.surgellm.iwn is not None:
            collate = None if hasattr(self.rows, "column_names") else self._collate
            model.fit_statistics(DataLoader(self.rows, self.batch_size, collate_fn=collate))

    @classmethod
    def _collate(cls, rows) -> Dict[str, torch.Tensor]:
        """A list or torch Dataset of the processor's rows: each column stacked."""
        return {k: torch.stack([torch.as_tensor(_field(r, k)) for r in rows]) for k in cls.COLUMNS}


def _field(row, name: str):
    if not isinstance(row, Mapping) or name not in row:
        raise ValueError(
            f"the training rows must be mappings holding {name!r} (SurgeLLMProcessor's rows), "
            f"got {type(row).__name__}"
            + (f" with keys {sorted(row)}" if isinstance(row, Mapping) else "")
        )
    return row[name]


def _column(dataset, name: str) -> list:
    """Each row's ``name``: a datasets.Dataset's column, else read row by row
    (a list or torch Dataset of the processor's rows, as Trainer takes)."""
    if hasattr(dataset, "column_names"):
        return dataset[name]
    return [int(_field(dataset[i], name)) for i in range(len(dataset))]


def task_metrics(
    predictions: Sequence[int],
    labels: Sequence[int],
    task_ids: Sequence[int],
    task_names: Sequence[str],
) -> Dict:
    """``{"macro_f1": <mean over tasks>, "tasks": {<task>: {"macro_f1",
    "accuracy", "n"}}}`` over the tasks present, in task order
    (scikit-learn's ``f1_score(average="macro")`` and ``accuracy_score``)."""
    from sklearn.metrics import accuracy_score, f1_score

    predictions, labels, task_ids = map(np.asarray, (predictions, labels, task_ids))
    if not len(predictions) == len(labels) == len(task_ids):
        raise ValueError(
            f"predictions, labels and task_ids must have one length, got "
            f"{len(predictions)}, {len(labels)} and {len(task_ids)}"
        )
    T = len(task_names)
    # a row of no task would be left out of every task's figures
    if task_ids.size and not np.issubdtype(task_ids.dtype, np.integer):
        raise ValueError(f"task_ids must be task indices in [0, {T}), got {task_ids.dtype} values")
    bad = np.flatnonzero((task_ids < 0) | (task_ids >= T))
    if bad.size:
        raise ValueError(
            f"task_ids must be task indices in [0, {T}), got task_ids[{bad[0]}]={task_ids[bad[0]]}"
        )
    results = {}
    for t, name in enumerate(task_names):
        rows = task_ids == t
        if rows.any():
            true, pred = labels[rows], predictions[rows]
            results[name] = {
                "macro_f1": float(f1_score(true, pred, average="macro")),
                "accuracy": float(accuracy_score(true, pred)),
                "n": int(rows.sum()),
            }
    if not results:
        raise ValueError("no examples to evaluate")
    mean = float(np.mean([r["macro_f1"] for r in results.values()]))
    return {"macro_f1": mean, "tasks": results}


def compute_metrics_for(task_names: Sequence[str]):
    """``Trainer``'s ``compute_metrics``: the mean macro-F1 (``macro_f1``, what
    the best checkpoint is chosen by) and each task's macro-F1 and accuracy."""
    check_metric_task_names(task_names)

    def compute_metrics(eval_prediction) -> Dict[str, float]:
        label_ids = eval_prediction.label_ids
        if not isinstance(label_ids, (tuple, list)) or len(label_ids) != 2:
            raise ValueError(
                "compute_metrics_for needs each row's labels and task ids: give Trainer "
                'TrainingArguments(label_names=["labels", "task_ids"]) (SurgeLLMTrainingArguments '
                "sets it)"
            )
        labels, task_ids = label_ids
        metrics = task_metrics(
            np.argmax(eval_prediction.predictions, -1), labels, task_ids, task_names
        )
        flat = {"macro_f1": metrics["macro_f1"]}
        for name, m in metrics["tasks"].items():
            flat.update({f"{name}_macro_f1": m["macro_f1"], f"{name}_accuracy": m["accuracy"]})
        return flat

    return compute_metrics
