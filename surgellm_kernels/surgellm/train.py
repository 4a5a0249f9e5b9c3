"""The training command, a thin layer over ``transformers``' ``Trainer``::

    python -m surgellm_kernels.train --encoder NAME_OR_PATH --train FILE.jsonl \\
        [--eval FILE.jsonl] --output DIR [--no-iwn] [--no-gate] [--no-prefix] \\
        [--max-length 128] [--lexicon VOCAB.json] [--kernels fused|reference] \\
        [--resume] [any TrainingArguments option: --epochs, --lr, --batch-size,
         --max-steps, --seed, --bf16, --gradient-accumulation-steps, ...]

Reads and checks the data (``datasets``; a bad row is reported as
``file:line``), builds a ``SurgeLLMForSequenceClassification`` on the encoder
with one head per task of the training data, and trains it with
``SurgeLLMTrainer``: the paper's recipe as defaults (see
``surgellm_kernels.surgellm.trainer``), the IWN statistics fitted on the
training split before the first step, task-homogeneous batches, evaluation
every epoch (on ``--eval``, else on the training data) keeping the best
checkpoint by mean macro-F1, checkpoints and ``trainer_state.json`` in
``--output``. Writes the model, its tokenizer and ``metrics.json``. Runs
data-parallel under ``torchrun`` / ``accelerate launch`` (IWN then synced
across ranks). Bad data or arguments print ``error: <message>`` and exit 2.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Optional, Sequence

__all__ = ["main", "SurgeLLMArguments"]

METRICS_FILE = "metrics.json"  # the run's per-task metrics, in --output


@dataclasses.dataclass
class SurgeLLMArguments:
    """The model and data options of the command (the rest are
    ``TrainingArguments``)."""

    encoder: str = dataclasses.field(
        metadata={"help": "transformers encoder: a model name or a local directory"}
    )
    train: str = dataclasses.field(metadata={"help": "JSON-lines file: text, task, label"})
    eval: Optional[str] = dataclasses.field(
        default=None, metadata={"help": "JSON-lines file to evaluate on; none: --train's"}
    )
    no_iwn: bool = dataclasses.field(default=False, metadata={"help": "ablation: no IWN"})
    no_gate: bool = dataclasses.field(
        default=False, metadata={"help": "ablation: no surgical gate"}
    )
    no_prefix: bool = dataclasses.field(
        default=False, metadata={"help": "ablation: no task prefix"}
    )
    max_length: int = dataclasses.field(
        default=128, metadata={"help": "tokens per input, the prefix included"}
    )
    lexicon: Optional[str] = dataclasses.field(
        default=None,
        metadata={
            "help": "word lists for the lexical features: a JSON file from "
            "python -m surgellm_kernels.vocabulary"
        },
    )
    iwn_statistics: str = dataclasses.field(
        default="fit",
        metadata={
            "choices": ["fit", "batch"],
            "help": "fit: the paper's fixed statistics of the training "
            "split, fitted before the first step; batch: "
            "class-balanced batch statistics (synced across ranks)",
        },
    )
    config_overrides: Optional[str] = dataclasses.field(
        default=None,
        metadata={"help": "other SurgeLLMConfig fields, e.g. 'head_dropout=0,alpha=0.2'"},
    )
    kernels: str = dataclasses.field(
        default="fused",
        metadata={
            "choices": ["fused", "reference"],
            "help": "fused: patch_model (default); reference: PyTorch",
        },
    )
    resume: bool = dataclasses.field(
        default=False, metadata={"help": "resume from the last checkpoint in --output"}
    )


def parser():
    from transformers import HfArgumentParser

    from ._cli import UsageError
    from .trainer import SurgeLLMTrainingArguments

    class Parser(HfArgumentParser):
        def error(self, message):  # the command prints it, and exits with 2
            raise UsageError(message)

    return Parser(
        (SurgeLLMArguments, SurgeLLMTrainingArguments),
        prog="python -m surgellm_kernels.train",
        description="Train a SURGELLM model on JSON-lines data.",
    )


# The SurgeLLMConfig fields --config-overrides may set; the command sets the
# others from its own options and the data. A value must have the type of
# the field's default (an int is taken where a float is expected).
OVERRIDABLE = ("alpha", "eps", "head_dropout", "head_hidden_dropout", "initializer_range")


def overrides(options: SurgeLLMArguments) -> dict:
    """``--config-overrides`` as keyword arguments: ``name=value`` pairs, the
    values Python literals (numbers, True / False, strings)."""
    import ast
    import inspect

    from ._cli import UsageError
    from .configuration_surgellm import SurgeLLMConfig, check_numbers

    result = {}
    for pair in filter(None, (options.config_overrides or "").split(",")):
        name, equals, text = pair.partition("=")
        name = name.strip()
        if not equals or not name.isidentifier():
            raise UsageError(f"argument --config-overrides: expected name=value, got {pair!r}")
        if name not in OVERRIDABLE:
            raise UsageError(
                f"argument --config-overrides: {name!r} is not a field it sets; it takes "
                + ", ".join(sorted(OVERRIDABLE))
            )
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()
        default = inspect.signature(SurgeLLMConfig).parameters[name].default
        if isinstance(default, float) and type(value) is int:
            value = float(value)
        if type(value) is not type(default):
            raise UsageError(
                f"argument --config-overrides: {name} must be a {type(default).__name__}, "
                f"got {text.strip()!r}"
            )
        result[name] = value
    try:
        check_numbers(**result)
    except ValueError as exc:
        raise UsageError(f"argument --config-overrides: {exc}") from None
    return result


def parse(argv: Optional[Sequence[str]] = None):
    """(SurgeLLMArguments, SurgeLLMTrainingArguments) of the command line;
    ``UsageError`` for a bad one."""
    import torch

    from ._cli import UsageError
    from .trainer import accelerator_present, check_metric_arguments, check_training_arguments

    argv = list(sys.argv[1:] if argv is None else argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        argv = ["--use_cpu", "true", *argv]  # torchrun on CPUs: data-parallel over gloo
    if not accelerator_present():  # the user's own flag, later, still wins
        argv = ["--dataloader_pin_memory", "false", *argv]
    options, training_args = parser().parse_args_into_dataclasses(args=argv)
    overrides(options)  # checked here, applied when the model is built
    for name, value, least in (
        ("--batch-size", training_args.per_device_train_batch_size, 1),
        ("--per-device-eval-batch-size", training_args.per_device_eval_batch_size, 1),
        ("--gradient-accumulation-steps", training_args.gradient_accumulation_steps, 1),
        ("--max-length", options.max_length, 2),
    ):
        if value < least:
            raise UsageError(f"argument {name}: must be >= {least}, got {value}")
    for name, value in (
        ("--learning-rate", training_args.learning_rate),
        ("--head-learning-rate", training_args.head_learning_rate),
    ):
        if value is not None and not value >= 0:
            raise UsageError(f"argument {name}: must be >= 0, got {value}")
    if training_args.max_steps <= 0 and not training_args.num_train_epochs > 0:
        raise UsageError(
            f"argument --epochs: must be > 0 (or give --max-steps), got "
            f"{training_args.num_train_epochs}"
        )
    if not 0 <= training_args.seed < 2**32:  # numpy's seeds
        raise UsageError(f"argument --seed: must be in [0, 2**32), got {training_args.seed}")
    check_training_arguments(training_args)  # before the encoder is loaded
    check_metric_arguments(training_args)
    output = training_args.output_dir
    if os.path.exists(output) and not os.path.isdir(output):
        raise UsageError(f"argument --output: {output} is not a directory")
    if options.resume and training_args.resume_from_checkpoint:
        raise UsageError(
            "--resume (the last checkpoint in --output) and --resume-from-checkpoint: give one"
        )
    checkpoint = training_args.resume_from_checkpoint
    if checkpoint and not os.path.isdir(checkpoint):
        raise UsageError(
            f"argument --resume-from-checkpoint: {checkpoint} is not a directory (pass a "
            "checkpoint-N directory of a run)"
        )
    if options.resume:
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(output) if os.path.isdir(output) else None
        if last is None:
            raise UsageError(f"--resume: no checkpoint in {output}")
        training_args.resume_from_checkpoint = last
    resuming = options.resume or checkpoint
    if not resuming and holds_a_run(output):
        # Trainer would mix this run's checkpoints with those there (and keep,
        # or later resume from, the other run's)
        raise UsageError(
            f"argument --output: {output} holds another run's checkpoints or model: pass "
            "--resume to continue that run, or a directory without them"
        )
    return options, training_args


def holds_a_run(directory: str) -> bool:
    """Whether ``directory`` holds what a training run writes (checkpoints,
    its state, a model); other files (a log, a .gitkeep) do not count."""
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
    from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_NAME

    if not os.path.isdir(directory):
        return False
    run_files = {TRAINER_STATE_NAME, CONFIG_NAME, SAFE_WEIGHTS_NAME, METRICS_FILE}
    return any(
        name in run_files or name.startswith(f"{PREFIX_CHECKPOINT_DIR}-")
        for name in os.listdir(directory)
    )


# What a checkpoint's model must share with the one this run builds for
# --resume to continue it: the task order (task ids, heads, prefix tokens),
# the classes, the parts, the inputs and the encoder.
RESUME_FIELDS = ("tasks", "class_names", "iwn", "gate", "prefix", "max_seq_length", "lexicon")
RESUME_FIELDS += ("alpha", "eps", "head_dropout", "head_hidden_dropout", "encoder_config")


def resume_mismatch(checkpoint: str, config) -> Optional[str]:
    """How the model saved in ``checkpoint`` differs from the one ``config``
    describes, in words (None when it does not)."""
    from .configuration_surgellm import SurgeLLMConfig

    def fields(c):
        values = c.to_dict()
        encoder = dict(values.get("encoder_config") or {})
        for name in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
            encoder.pop(name, None)  # where it was loaded from, not what it is
        return {**{k: values.get(k) for k in RESUME_FIELDS}, "encoder_config": encoder}

    saved, built = fields(SurgeLLMConfig.from_pretrained(checkpoint)), fields(config)
    differ = [k for k in RESUME_FIELDS if saved[k] != built[k]]
    if not differ:
        return None
    shown = []
    for k in differ:
        if k == "encoder_config":
            a, b = saved[k], built[k]
            names = sorted(f for f in set(a) | set(b) if a.get(f) != b.get(f))
            shown.append(f"the encoder's {', '.join(names[:4])} differ")
        elif k == "lexicon":
            shown.append("the word lists differ")
        else:
            shown.append(f"{k} {saved[k]!r} there, {built[k]!r} here")
    return "; ".join(shown)


def saved_statistics_frozen(checkpoint: str, model) -> Optional[bool]:
    """Whether the IWN statistics saved in ``checkpoint`` are fitted (frozen),
    as every checkpoint of an ``--iwn-statistics fit`` run has them; None
    where ``model`` (the one the checkpoint resumes) has no IWN, or the
    checkpoint no such buffer (or no single-file weights)."""
    import torch
    from safetensors import safe_open
    from transformers.utils import SAFE_WEIGHTS_NAME, WEIGHTS_NAME

    key = next((n for n, _ in model.named_buffers() if n.endswith(".statistics_frozen")), None)
    if key is None:
        return None
    path = os.path.join(checkpoint, SAFE_WEIGHTS_NAME)
    if os.path.isfile(path):
        with safe_open(path, "pt") as f:
            return bool(f.get_tensor(key)) if key in f.keys() else None
    path = os.path.join(checkpoint, WEIGHTS_NAME)
    if os.path.isfile(path):
        state = torch.load(path, map_location="cpu", weights_only=True)
        return bool(state[key]) if key in state else None
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ._cli import UsageError, fail, patch_for_kernels, say, write_json
    from .data import DataError, LabelSpace, check_metric_task_names, load_examples
    from .features import LexicalFeaturizer

    try:
        options, args = parse(argv)
    except UsageError as exc:
        return fail(f"{exc} (options: --help)")
    except ValueError as exc:  # what TrainingArguments itself refuses
        return fail(str(exc))
    main_process = args.process_index == 0

    # -- data, checked before the encoder is loaded ---------------------------------------
    try:
        train_rows = load_examples(options.train)
        eval_rows = load_examples(options.eval) if options.eval else train_rows
        space = LabelSpace.from_examples(train_rows, options.train)
        train_labels = space.encode(train_rows, options.train)
        eval_labels = space.encode(eval_rows, options.eval or options.train)
    except DataError as exc:
        return fail(str(exc))
    lexicon = None
    if options.lexicon:
        try:
            with open(options.lexicon, encoding="utf-8") as f:
                lexicon = LexicalFeaturizer.from_json(f.read())
        except (OSError, ValueError, TypeError) as exc:
            return fail(f"--lexicon {options.lexicon}: {exc}")
    if main_process:
        say(
            f"train: {options.train}: {len(train_rows)} examples; tasks: "
            + ", ".join(f"{t} ({len(c)} classes)" for t, c in space.classes.items())
        )
        say(
            f"eval: {options.eval or options.train + ' (no --eval given)'}: "
            f"{len(eval_rows)} examples"
        )

    try:
        check_metric_task_names(sorted(set(space.classes) | set(eval_rows["task"])))
    except ValueError as exc:
        return fail(f"{exc} in the data files")
    metric = args.metric_for_best_model
    known = {"loss", "macro_f1"} | {  # per task: of the tasks scored
        f"{task}_{m}" for task in set(eval_rows["task"]) for m in ("macro_f1", "accuracy")
    }
    if metric is not None and metric not in known and metric.removeprefix("eval_") not in known:
        return fail(
            f"--metric-for-best-model {metric!r}: not a metric of this run; one of "
            + ", ".join(sorted(known))
        )

    # -- the model ----------------------------------------------------------------------------
    from transformers import AutoTokenizer, DataCollatorWithPadding, set_seed

    from ..nn import convert_sync_iwn
    from .modeling_surgellm import SurgeLLMForSequenceClassification, check_encoder_path
    from .processing_surgellm import SurgeLLMProcessor
    from .trainer import FitIWNStatistics, SurgeLLMTrainer, compute_metrics_for, task_metrics

    set_seed(args.seed)
    try:
        check_encoder_path(options.encoder)
        tokenizer = AutoTokenizer.from_pretrained(options.encoder)
        model = SurgeLLMForSequenceClassification.from_encoder(
            options.encoder,
            space.class_names(),
            tokenizer=tokenizer,
            iwn=not options.no_iwn,
            gate=not options.no_gate,
            prefix=not options.no_prefix,
            max_seq_length=options.max_length,
            lexicon=lexicon,
            **overrides(options),
        )
        processor = SurgeLLMProcessor(tokenizer, model.config)
        train_data = processor.map(train_rows, train_labels, options.train)
        eval_data = processor.map(eval_rows, eval_labels, options.eval or options.train)
    except OSError as exc:
        return fail(f"cannot load the encoder {options.encoder!r}: {exc}")
    except (ValueError, TypeError) as exc:  # e.g. a max_length too short for the prefix
        return fail(str(exc))
    config = model.config
    if main_process:
        say(
            f"model: {options.encoder}, {model.num_parameters():,} parameters, "
            f"iwn={config.iwn} gate={config.gate} prefix={config.prefix} "
            f"max_length={config.max_seq_length}, "
            f"{config.featurizer().num_features} lexical features"
        )
    patch_for_kernels(model, options.kernels, verbose=main_process)
    if args.world_size > 1:  # class-balanced statistics over the global batch
        convert_sync_iwn(model)
        if main_process and config.iwn:
            say(
                f"iwn: statistics over the global batch of {args.world_size} ranks (the "
                "fused synchronized layer"
                + (", with --kernels reference too)" if options.kernels != "fused" else ")")
            )

    # -- training -----------------------------------------------------------------------------
    collator = DataCollatorWithPadding(tokenizer)
    callbacks = (
        [FitIWNStatistics(train_data, args.per_device_train_batch_size)]
        if config.iwn and options.iwn_statistics == "fit"
        else []
    )
    trainer = SurgeLLMTrainer(
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=compute_metrics_for(config.task_names),
        callbacks=callbacks,
    )
    resume = args.resume_from_checkpoint  # --resume's: the last checkpoint in --output
    flag = "--resume" if options.resume else "--resume-from-checkpoint"
    if resume:
        try:
            mismatch = resume_mismatch(resume, config)
        except (OSError, ValueError) as exc:
            return fail(f"{flag}: cannot read {resume}: {exc}")
        if mismatch:  # its weights would load into the wrong heads, or not at all
            return fail(
                f"{flag}: {resume} holds a model of other data or options ({mismatch}): "
                "pass the data and options of its run, or a new --output"
            )
        try:
            fitted = saved_statistics_frozen(resume, model)
        except Exception as exc:  # a damaged weights file: safetensors', pickle's errors
            return fail(f"{flag}: cannot read {resume}: {type(exc).__name__}: {exc}")
        if fitted is not None and fitted != (options.iwn_statistics == "fit"):
            return fail(
                f"{flag}: {resume} was trained with --iwn-statistics "
                f"{'fit' if fitted else 'batch'}, this run has {options.iwn_statistics}: "
                "pass the options of its run, or a new --output"
            )
    result = trainer.train(resume_from_checkpoint=resume)

    # -- saving and evaluation ----------------------------------------------------------------
    if main_process:  # first: evaluation outside training may cast the model (--bf16-full-eval)
        trainer.save_model(args.output_dir)
        trainer.save_state()  # trainer_state.json: the log and the best checkpoint
        processor.save_pretrained(args.output_dir)
    prediction = trainer.predict(eval_data)
    labels, task_ids = prediction.label_ids
    metrics = task_metrics(prediction.predictions.argmax(-1), labels, task_ids, config.task_names)
    if main_process:
        write_json(os.path.join(args.output_dir, METRICS_FILE), metrics)
        say(f"trained {result.global_step} steps in {result.metrics['train_runtime']:.1f}s")
        say(f"metrics on {options.eval or options.train}:")
        from .evaluate import format_metrics

        say(format_metrics(metrics))
        say(f"saved the model, its tokenizer and metrics.json to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
