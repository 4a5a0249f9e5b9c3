"""The training and evaluation commands end to end on a tiny local encoder
(as subprocesses), their data errors (in-process), and the metrics."""

import json
import os
import subprocess
import sys

import pytest
import torch

from surgellm_kernels import LexicalFeaturizer, backends, evaluate, train
from surgellm_kernels.surgellm import SurgeLLMConfig
from surgellm_kernels.surgellm.data import DataError, LabelSpace, load_examples
from surgellm_kernels.surgellm.trainer import task_metrics

from _tiny_encoder import TASKS, synthetic_examples, write_tiny_encoder

pytest.importorskip("transformers")
pytest.importorskip("datasets")  # the commands read their data with it
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# reasoning gets int labels (sorted numerically: 2 < 7 < 10), the other tasks string labels
INT_LABELS = {"reasoning": [7, 2, 10]}
SMALL = ["--max-steps", "3", "--batch-size", "8", "--max-length", "64", "--disable-tqdm", "false"]


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def synthetic_records(n, seed):
    texts, tasks, labels = synthetic_examples(n, seed)
    return [
        {"text": x, "task": t, "label": INT_LABELS[t][y] if t in INT_LABELS else TASKS[t][y]}
        for x, t, y in zip(texts, tasks, labels)
    ]


def task_counts(records):
    counts = {}
    for r in records:
        counts[r["task"]] = counts.get(r["task"], 0) + 1
    return counts


def run_module(module, *args):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def check_metrics(metrics, counts):
    assert set(metrics) == {"macro_f1", "tasks"}
    assert set(metrics["tasks"]) == set(counts)
    for task, m in metrics["tasks"].items():
        assert set(m) == {"macro_f1", "accuracy", "n"}, task
        assert isinstance(m["n"], int) and m["n"] == counts[task]
        for key in ("macro_f1", "accuracy"):
            assert isinstance(m[key], float) and 0 <= m[key] <= 1, (task, key)
    assert isinstance(metrics["macro_f1"], float)
    mean = sum(m["macro_f1"] for m in metrics["tasks"].values()) / len(counts)
    assert metrics["macro_f1"] == pytest.approx(mean, abs=1e-12)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_command")
    train_records, eval_records = synthetic_records(96, seed=1), synthetic_records(40, seed=2)
    # every (task, label) of the eval file occurs in the training file
    seen = {(r["task"], r["label"]) for r in train_records}
    eval_records = [r for r in eval_records if (r["task"], r["label"]) in seen]
    assert len(task_counts(eval_records)) == 3 and len(seen) == 7
    return {
        "root": root,
        "encoder": write_tiny_encoder(str(root / "encoder")),
        "train": write_jsonl(root / "train.jsonl", train_records),
        "eval": write_jsonl(root / "eval.jsonl", eval_records),
        "train_counts": task_counts(train_records),
        "eval_counts": task_counts(eval_records),
    }


@pytest.fixture(scope="module")
def trained(files):
    out = files["root"] / "model"
    result = run_module(
        "surgellm_kernels.train",
        "--encoder",
        files["encoder"],
        "--train",
        files["train"],
        "--eval",
        files["eval"],
        "--output",
        out,
        *SMALL,
    )
    return out, result


# -- end to end -----------------------------------------------------------------------------
def test_train_command(files, trained):
    out, result = trained
    assert result.returncode == 0, result.stderr
    for name in (
        "metrics.json",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "trainer_state.json",
    ):
        assert (out / name).is_file(), name
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    check_metrics(metrics, files["eval_counts"])
    # the patch report's table, on this machine's fast path
    stdout = result.stdout
    assert "kernels: fused" in stdout and "2 swapped, 0 skipped" in stdout
    for row in (
        ("surgellm.iwn", "InstanceWeightedNorm", "FusedInstanceWeightedNorm"),
        ("surgellm.fusion", "SurgicalGate", "FusedSurgicalGate"),
    ):
        assert any(line.split()[:3] == list(row) for line in stdout.splitlines()), row
    if backends("cpu")["cpu"].available:
        assert "fast path is not taken" not in stdout
    assert f"metrics on {files['eval']}" in stdout and "trained 3 steps" in stdout
    for task, m in metrics["tasks"].items():  # the per-task table
        assert any(line.split()[:2] == [task, str(m["n"])] for line in stdout.splitlines())
    assert "it/s" in result.stderr  # Trainer's progress bar
    # no warning about pinned memory where there is no accelerator to copy to
    assert "pin_memory" not in result.stderr
    with open(out / "trainer_state.json") as f:
        assert json.load(f)["global_step"] == 3
    config = SurgeLLMConfig.from_pretrained(out)
    # string labels sorted, int labels sorted as numbers
    assert config.class_names == {
        "sentiment": ["negative", "positive"],
        "authorship": ["human", "llm"],
        "reasoning": ["2", "7", "10"],
    }
    assert config.iwn and config.gate and config.prefix and config.max_seq_length == 64


def test_evaluate_command_gives_the_same_metrics(files, trained):
    out, result = trained
    assert result.returncode == 0, result.stderr
    target = files["root"] / "m.json"
    # the batch size of the training run's evaluation: the same padding, the same logits
    ran = run_module(
        "surgellm_kernels.evaluate",
        "--model",
        out,
        "--data",
        files["eval"],
        "--batch-size",
        "8",
        "--output",
        target,
    )
    assert ran.returncode == 0, ran.stderr
    with open(target) as f, open(out / "metrics.json") as g:
        assert json.load(f) == json.load(g)
    assert "FusedSurgicalGate" in ran.stdout and "mean" in ran.stdout
    assert "pin_memory" not in ran.stderr
    with pytest.raises(ValueError, match="holds a BertConfig, not a SURGELLM model"):
        from surgellm_kernels.surgellm import SurgeLLMProcessor

        SurgeLLMProcessor.from_pretrained(files["encoder"])


def test_train_command_reference_kernels_and_ablations(files):
    out = files["root"] / "ablated"
    result = run_module(
        "surgellm_kernels.train",
        "--encoder",
        files["encoder"],
        "--train",
        files["train"],
        "--output",
        out,
        *SMALL,
        "--kernels",
        "reference",
        "--no-iwn",
        "--no-gate",
        "--no-prefix",
    )
    assert result.returncode == 0, result.stderr
    assert "kernels: reference" in result.stdout and "Fused" not in result.stdout
    assert "(no --eval given)" in result.stdout
    with open(out / "metrics.json") as f:
        check_metrics(json.load(f), files["train_counts"])
    config = SurgeLLMConfig.from_pretrained(out)
    assert not (config.iwn or config.gate or config.prefix)
    assert (out / "model.safetensors").is_file()


# -- bad data and arguments (in-process: they fail before the encoder loads) -----------------
GOOD = {"text": "great film", "task": "sentiment", "label": "positive"}


def record(**changes):
    r = dict(GOOD, **changes)
    return {k: v for k, v in r.items() if v is not None}


def training_set():
    return [
        record(),
        record(label="negative", text="dull"),
        record(task="reasoning", label=1, text="first then"),
        record(task="reasoning", label=2, text="according to"),
    ]


@pytest.mark.parametrize(
    "train_lines, eval_lines, where, message",
    [
        ([record(), record(task=None)], None, "train:2", 'missing field "task"'),
        (
            training_set(),
            [record(), record(), record(task="other")],
            "eval:3",
            "unknown task 'other' (training tasks: sentiment, reasoning)",
        ),
        ([], None, "train", "no examples"),
        (["", "  "], None, "train", "no examples"),
        (training_set(), None, "eval", "no examples"),
        (
            training_set(),
            [record(), record(label="neutral")],
            "eval:2",
            "label 'neutral' of task 'sentiment' does not occur in the training data",
        ),
        (
            training_set(),
            [record(task="reasoning", label=3)],
            "eval:1",
            "label 3 of task 'reasoning' does not occur in the training data (its classes: "
            "1, 2; labels are matched as written, not as class indices)",
        ),
        (
            [record(), '{"text": "x", "task": "sentiment", "label": }'],
            None,
            "train:2",
            "invalid JSON",
        ),
        (
            training_set() + [record(task="reasoning", label="chain")],
            None,
            "train:5",
            "task 'reasoning' mixes int and string labels: label 'chain' here, label 1 on line 3",
        ),
        (
            [record(), record(label="positive", text="good")],
            None,
            "train:1",
            "task 'sentiment' has a single class ('positive')",
        ),
    ],
    ids=[
        "missing-field",
        "unknown-task-at-eval",
        "empty-file",
        "blank-file",
        "empty-eval",
        "label-only-at-eval",
        "int-label-only-at-eval",
        "invalid-json",
        "mixed-label-types",
        "single-class",
    ],
)
def test_train_command_data_errors(tmp_path, capsys, train_lines, eval_lines, where, message):
    paths = {
        "train": write_jsonl(tmp_path / "train.jsonl", train_lines),
        "eval": str(tmp_path / "eval.jsonl"),
    }
    args = [
        "--encoder",
        str(tmp_path / "never-loaded"),
        "--train",
        paths["train"],
        "--output",
        str(tmp_path / "out"),
    ]
    if eval_lines is not None or where.startswith("eval"):
        write_jsonl(paths["eval"], eval_lines or [])
        args += ["--eval", paths["eval"]]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    name, _, line = where.partition(":")
    prefix = f"error: {paths[name]}:{line}: " if line else f"error: {paths[name]}: "
    assert err.startswith(prefix) and message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "line, message",
    [
        ('["text", "task", "label"]', "expected a JSON object, got an array"),
        ('{"text": 3, "task": "a", "label": 1}', 'field "text" must be a string, got an int'),
        ('{"text": "x", "task": "", "label": 1}', 'field "task" must be a non-empty string'),
        (
            '{"text": "x", "task": 4, "label": 1}',
            'field "task" must be a non-empty string, got an int',
        ),
        ('{"text": "x", "task": "a b", "label": 1}', "may not contain white space"),
        (
            '{"text": "x", "task": "a", "label": true}',
            'field "label" must be an int or a string, got a boolean',
        ),
        ('{"text": "x", "task": "a", "label": 1.0}', "got a float"),
        ('{"text": "x", "task": "a", "label": null}', "got null"),
        ('{"text": "x", "label": 1}', 'missing field "task"'),
        ('{"text": "a\\ud800b", "task": "a", "label": 1}', "a lone surrogate: not text"),
        ("[" * 100_000, "invalid JSON: nested too deeply"),
        ('{"text": "x", "task": "a", "label": 0, "label": 1}', "gives 'label' twice"),
    ],
)
def test_load_examples_errors(tmp_path, line, message):
    path = write_jsonl(tmp_path / "d.jsonl", ["", json.dumps(GOOD), line])
    with pytest.raises(DataError) as info:
        load_examples(path)
    assert str(info.value).startswith(f"{path}:3: ") and message in str(info.value)


def test_load_examples_reads_the_file_named_as_it_is_now(tmp_path):
    """A name is no pattern (?, [1]), a file rewritten with the same size and
    time is read again (no cache), and lines end at \\n, \\r\\n or \\r."""
    pattern = write_jsonl(tmp_path / "d?.jsonl", [record(label="one")])
    write_jsonl(tmp_path / "dX.jsonl", [record(label="other")])
    assert list(load_examples(pattern)["label"]) == ["one"]
    brackets = write_jsonl(tmp_path / "e[1].jsonl", [record(label="two")])
    assert list(load_examples(brackets)["label"]) == ["two"]
    stamp = os.stat(pattern).st_mtime_ns
    write_jsonl(pattern, [record(label="ONE")])  # the same size
    os.utime(pattern, ns=(stamp, stamp))
    assert list(load_examples(pattern)["label"]) == ["ONE"]
    good = json.dumps(GOOD).encode()
    path = tmp_path / "ends.jsonl"
    path.write_bytes(good + b"\r\n" + good + b"\r" + b'{"text": 1}' + b"\n")
    with pytest.raises(DataError, match=r"ends\.jsonl:3: missing field"):
        load_examples(path)


@pytest.mark.parametrize("first", [b"", b"\n"], ids=["a line", "an empty line"])
def test_a_byte_order_mark_is_read_as_utf8(tmp_path, first):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + first + (json.dumps(GOOD) + "\n").encode() * 2)
    assert list(load_examples(path)["text"]) == [GOOD["text"]] * 2


def test_bytes_that_are_not_utf8_are_named_by_line(tmp_path):
    path = tmp_path / "d.jsonl"
    good = (json.dumps(GOOD) + "\n").encode()
    bad = b'{"text": "caf\xe9", "task": "a", "label": 1}\n'
    for end in (b"\n", b"\r"):  # lines ended by \r alone are counted too
        path.write_bytes((good * 2 + bad + good).replace(b"\n", end))
        with pytest.raises(DataError) as info:
            load_examples(path)
        assert str(info.value).startswith(f"{path}:3: not UTF-8 text: byte 14 of the line")


def test_load_examples_and_label_space(tmp_path):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            record(task="b", label=10),
            "",
            record(task="a", label="y"),
            record(task="b", label=2),
            record(task="a", label="X"),
            record(task="a", label="y", extra=1),
            record(task="b", label=7),
        ],
    )
    examples = load_examples(path)
    assert list(zip(examples["task"], examples["label"], examples["line"])) == [
        ("b", "10", 1),
        ("a", "y", 3),
        ("b", "2", 4),
        ("a", "X", 5),
        ("a", "y", 6),
        ("b", "7", 7),
    ]
    space = LabelSpace.from_examples(examples, path)
    assert space.tasks == ["b", "a"]
    assert space.classes == {"b": [2, 7, 10], "a": ["X", "y"]}
    assert space.class_names() == {"b": ["2", "7", "10"], "a": ["X", "y"]}
    assert space.encode(examples, path) == [2, 1, 0, 0, 1, 1]
    with pytest.raises(DataError, match="cannot read the file: no such file"):
        load_examples(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="cannot read the file: it is a directory"):
        load_examples(tmp_path)


@pytest.mark.parametrize("accelerator", [False, True])
def test_pinned_memory_only_with_an_accelerator(monkeypatch, accelerator):
    """Batches are pinned where torch sees an accelerator (transformers'
    default) and not on a CPU-only host; the user's own flags still win."""
    from surgellm_kernels.surgellm import trainer as trainer_module
    from surgellm_kernels.surgellm.train import parse

    monkeypatch.setattr(trainer_module, "accelerator_present", lambda: accelerator)
    base = ["--encoder", "e", "--train", "t.jsonl", "--output", "out"]
    assert parse(base)[1].dataloader_pin_memory is accelerator
    assert parse([*base, "--dataloader_pin_memory", "true"])[1].dataloader_pin_memory is True
    assert parse([*base, "--no_dataloader_pin_memory"])[1].dataloader_pin_memory is False


def test_bad_arguments(tmp_path, capsys):
    assert (
        train.main(
            ["--encoder", "x", "--train", "t.jsonl", "--output", str(tmp_path), "--batch-size", "0"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "error: argument --batch-size: must be >= 1, got 0" in err
    assert "Traceback" not in err
    assert train.main(["--encoder", "x", "--output", str(tmp_path)]) == 2
    assert "error: the following arguments are required: --train" in capsys.readouterr().err
    assert (
        train.main(
            ["--encoder", "x", "--train", "t.jsonl", "--output", str(tmp_path), "--kernels", "fast"]
        )
        == 2
    )
    assert "error: argument --kernels: invalid choice" in capsys.readouterr().err
    assert (
        train.main(
            [
                "--encoder",
                "x",
                "--train",
                "t.jsonl",
                "--output",
                str(tmp_path),
                "--no-such-option",
                "1",
            ]
        )
        == 2
    )
    assert "--no-such-option" in capsys.readouterr().err
    assert evaluate.main(["--model", str(tmp_path / "nothing"), "--data", "x.jsonl"]) == 2
    assert "error: x.jsonl: cannot read the file" in capsys.readouterr().err
    base = ["--encoder", "x", "--train", "t.jsonl"]
    assert train.main(base) == 2  # TrainingArguments alone would pick ./trainer_output
    assert "error: the following arguments are required: --output" in capsys.readouterr().err
    for flag, value, message in (
        ("--lr", "-1", "argument --learning-rate: must be >= 0, got -1.0"),
        ("--head-learning-rate", "-1", "argument --head-learning-rate: must be >= 0"),
        ("--seed", "-1", "argument --seed: must be in [0, 2**32), got -1"),
        ("--seed", str(2**32), "argument --seed: must be in [0, 2**32)"),
        ("--config-overrides", "head_droput=0", "'head_droput' is not a field it sets"),
        ("--config-overrides", "iwn=False", "'iwn' is not a field it sets"),
        ("--config-overrides", "alpha=abc", "alpha must be a float, got 'abc'"),
        ("--label-smoothing-factor", "0.1", "label_smoothing_factor=0.1 is not supported"),
        ("--gradient-accumulation-steps", "0", "argument --gradient-accumulation-steps: must"),
        ("--per-device-eval-batch-size", "0", "argument --per-device-eval-batch-size: must"),
        ("--epochs", "0", "argument --epochs: must be > 0 (or give --max-steps), got 0.0"),
        (
            "--train-sampling-strategy",
            "sequential",
            "train_sampling_strategy='sequential' is not supported",
        ),
        (
            "--resume-from-checkpoint",
            str(tmp_path / "no-such-checkpoint"),
            "argument --resume-from-checkpoint: " + str(tmp_path / "no-such-checkpoint"),
        ),
        (
            "--config-overrides",
            "head_dropout=1.5",
            "argument --config-overrides: head_dropout must be a number in [0, 1), got 1.5",
        ),
        # Trainer's options that would drop or skip what the per-task metrics take
        ("--prediction-loss-only", "true", "prediction_loss_only=True is not supported"),
        ("--eval-do-concat-batches", "false", "eval_do_concat_batches=False is not supported"),
        ("--batch-eval-metrics", "true", "batch_eval_metrics=True is not supported"),
        ("--dataloader-drop-last", "true", "dataloader_drop_last=True is not supported"),
        ("--label-names", "labels", "label_names=['labels'] is not supported"),
    ):
        assert train.main([*base, "--output", str(tmp_path / "new"), flag, value]) == 2
        err = capsys.readouterr().err
        assert f"error: {message}" in err or message in err, (flag, value, err)
        assert "Traceback" not in err
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "checkpoint-8").mkdir()  # another run's
    assert train.main([*base, "--output", str(tmp_path / "used")]) == 2
    assert "holds another run's checkpoints or model: pass --resume" in capsys.readouterr().err
    both = ["--output", str(tmp_path / "used"), "--resume", "--resume-from-checkpoint", "c"]
    assert train.main([*base, *both]) == 2
    assert "give one" in capsys.readouterr().err
    # before the data and the encoder load (neither exists here)
    assert train.main([*base, "--output", str(tmp_path / "new"), "--resume"]) == 2
    assert f"error: --resume: no checkpoint in {tmp_path / 'new'}" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    from surgellm_kernels.surgellm.train import parse

    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "train.log").write_text("")  # not a run: accepted
    assert parse([*base, "--output", str(tmp_path / "logs")])[1].output_dir.endswith("logs")
    # As TrainingArguments: a higher metric is better, but for a loss (the best
    # checkpoint by eval loss was the one of the highest loss)
    logs = [*base, "--output", str(tmp_path / "logs")]
    assert parse(logs)[1].greater_is_better is True
    assert parse([*logs, "--metric-for-best-model", "loss"])[1].greater_is_better is False
    assert parse([*logs, "--max-steps", "3", "--epochs", "0"])[1].max_steps == 3
    # The best checkpoint at the end needs evaluations and checkpoints: the
    # error says which flag leaves it
    assert parse(logs)[1].load_best_model_at_end is True
    for strategy in ("--eval-strategy", "--save-strategy"):
        with pytest.raises(
            ValueError, match=f"pass --load-best-model-at-end false with {strategy}"
        ):
            parse([*logs, strategy, "no"])
        for off in (["--load-best-model-at-end", "false"], ["--no-load-best-model-at-end"]):
            assert parse([*logs, strategy, "no", *off])[1].load_best_model_at_end is False
    assert parse([*logs, "--load-best-model-at-end"])[1].load_best_model_at_end is True


def test_train_command_with_extracted_word_lists(files, tmp_path):
    """vocabulary command -> train --lexicon: the model trains on the
    extracted lists too and saves them (prefix fields and features widen)."""
    lexicon = tmp_path / "vocab.json"
    made = run_module(
        "surgellm_kernels.vocabulary",
        "--data",
        files["train"],
        "--top-k",
        "3",
        "--min-count",
        "2",
        "--output",
        lexicon,
    )
    assert made.returncode == 0, made.stderr
    featurizer = LexicalFeaturizer.from_json(lexicon.read_text())
    assert featurizer.num_features > 16
    out = tmp_path / "model"
    result = run_module(
        "surgellm_kernels.train",
        "--encoder",
        files["encoder"],
        "--train",
        files["train"],
        "--output",
        out,
        "--lexicon",
        lexicon,
        *SMALL,
        "--max-length",
        "96",
    )
    assert result.returncode == 0, result.stderr
    assert f"{featurizer.num_features} lexical features" in result.stdout
    assert SurgeLLMConfig.from_pretrained(out).featurizer() == featurizer


def test_train_command_bad_lexicon(files, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"groups": {"x": []}}')
    args = [
        "--encoder",
        files["encoder"],
        "--train",
        files["train"],
        "--output",
        str(tmp_path / "out"),
    ]
    assert train.main(args + ["--lexicon", str(bad)]) == 2
    assert f"error: --lexicon {bad}: groups['x'] must be a non-empty list" in (
        capsys.readouterr().err
    )
    assert train.main(args + ["--lexicon", str(tmp_path / "missing.json")]) == 2
    assert "error: --lexicon" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_train_command_model_errors(files, tmp_path, capsys):
    args = ["--train", files["train"], "--output", str(tmp_path / "out")]
    assert train.main(args + ["--encoder", files["encoder"], "--max-length", "20"]) == 2
    err = capsys.readouterr().err
    assert f"error: {files['train']}:" in err and "max_seq_length=20 cannot hold" in err
    # The row named is the one whose prefix the length cannot hold: counts of many digits.
    with open(files["train"]) as f:
        rows = f.read().splitlines()
    rows[3:3] = ["", json.dumps(record(text="great film " + "! " * 123456))]
    long_row = write_jsonl(tmp_path / "long_row.jsonl", rows)
    long_args = ["--train", long_row, "--output", str(tmp_path / "out"), "--max-length", "40"]
    assert train.main([*long_args, "--encoder", files["encoder"]]) == 2
    err = capsys.readouterr().err
    assert f"error: {long_row}:5: max_seq_length=40 cannot hold" in err, err
    # a metric the run does not compute: named before the first evaluation, not a KeyError after it
    assert train.main(args + ["--encoder", files["encoder"], "--metric-for-best-model", "f1"]) == 2
    err = capsys.readouterr().err
    assert "error: --metric-for-best-model 'f1': not a metric of this run; one of" in err, err
    assert "macro_f1" in err and "Traceback" not in err
    # per task: of the tasks --eval scores
    with open(files["train"]) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    tasks = sorted({row["task"] for row in rows})
    one_task = write_jsonl(
        tmp_path / "one_task.jsonl", [json.dumps(r) for r in rows if r["task"] == tasks[0]]
    )
    for metric, refused in ((f"{tasks[1]}_macro_f1", True), (f"eval_{tasks[0]}_accuracy", False)):
        # accepted, the run stops at the next check: a max length too short for the prefix
        given = ["--eval", one_task, "--metric-for-best-model", metric, "--max-length", "20"]
        assert train.main(args + ["--encoder", files["encoder"], *given]) == 2
        err = capsys.readouterr().err
        assert (f"--metric-for-best-model {metric!r}: not a metric" in err) == refused, err
        assert ("cannot hold" in err) != refused, err
    # a task whose metric names Trainer would take for the mean's: refused before the encoder
    for task in ("eval", f"eval_{tasks[0]}"):
        renamed = write_jsonl(
            tmp_path / "eval_task.jsonl",
            [json.dumps({**r, "task": task}) for r in rows if r["task"] == tasks[0]],
        )
        given = ["--train", renamed, "--output", str(tmp_path / "out")]
        assert train.main([*given, "--encoder", str(tmp_path / "no-encoder")]) == 2
        err = capsys.readouterr().err
        assert f"error: task {task!r}: Trainer reads metrics named eval" in err, err
    bad_eps = ["--encoder", str(tmp_path / "no-encoder"), "--config-overrides", "eps=0"]
    assert train.main(args + bad_eps) == 2  # the config's check, before the encoder loads
    err = capsys.readouterr().err
    assert "error: argument --config-overrides: eps must be a positive number, got 0.0" in err
    missing = str(tmp_path / "no-encoder")
    assert train.main(args + ["--encoder", missing]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot load the encoder {missing!r}" in err and "no such directory" in err
    assert not (tmp_path / "out").exists()


def test_evaluate_command_label_errors(files, trained, tmp_path, capsys):
    out, result = trained
    assert result.returncode == 0, result.stderr
    data = write_jsonl(tmp_path / "e.jsonl", [record(), record(task="reasoning", label=5)])
    assert evaluate.main(["--model", str(out), "--data", data]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: {data}:2: label 5 of task 'reasoning' does not occur in the training data"
    )
    data = write_jsonl(tmp_path / "e.jsonl", [record(task="other")])
    assert evaluate.main(["--model", str(out), "--data", data]) == 2
    assert capsys.readouterr().err.startswith(f"error: {data}:1: unknown task 'other'")


def test_processor_map_prints_nothing(files, trained, capfd):
    """The library prints through warnings and logging only: no progress bar."""
    from surgellm_kernels.surgellm import SurgeLLMProcessor

    out, result = trained
    assert result.returncode == 0, result.stderr
    processor = SurgeLLMProcessor.from_pretrained(out)
    rows = load_examples(files["eval"])
    labels = LabelSpace(processor.config.class_names).encode(rows, files["eval"])
    capfd.readouterr()
    assert len(processor.map(rows, labels)) == len(rows)
    assert capfd.readouterr() == ("", "")


def test_evaluate_command_damaged_weights(files, trained, tmp_path, capsys):
    out, result = trained
    assert result.returncode == 0, result.stderr
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in os.listdir(out):
        if os.path.isfile(out / name):
            (damaged / name).write_bytes((out / name).read_bytes())
    (damaged / "model.safetensors").write_bytes(b"\x01\x02")  # truncated
    assert evaluate.main(["--model", str(damaged), "--data", files["eval"]]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot load the model from {damaged}") and "Traceback" not in err


def test_resume_takes_the_steps_of_the_whole_run(files, tmp_path, capsys):
    """A run resumed from its first epoch's checkpoint takes the batches (so
    the losses) of the uninterrupted run (the sampler's pass is the epoch);
    a checkpoint of other data (tasks in another order) is refused."""
    args = ["--encoder", files["encoder"], "--train", files["train"], "--epochs", "2"]
    args += ["--batch-size", "16", "--max-length", "64", "--logging-steps", "1"]
    args += ["--save-total-limit", "3", "--load-best-model-at-end", "false"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert train.main([*args, "--output", str(whole)]) == 0
    saved = [p for p in os.listdir(whole) if p.startswith("checkpoint-")]
    first = min(saved, key=lambda p: int(p.split("-")[1]))  # the first epoch's
    resumed.mkdir()
    os.rename(whole / first, resumed / first)
    assert train.main([*args, "--output", str(resumed), "--resume"]) == 0

    def losses(run):
        with open(run / "trainer_state.json") as f:
            return {h["step"]: h["loss"] for h in json.load(f)["log_history"] if "loss" in h}

    step = int(first.split("-")[1])
    after = {k: v for k, v in losses(whole).items() if k > step}
    assert after and {k: losses(resumed)[k] for k in after} == pytest.approx(after, rel=1e-5)

    with open(files["train"]) as f:  # the same rows, the tasks first seen in another order
        rows = f.read().splitlines()
    last_task = list(files["train_counts"])[-1]  # tasks in order of first appearance
    rows.sort(key=lambda r: json.loads(r)["task"] != last_task)
    reordered = write_jsonl(tmp_path / "reordered.jsonl", rows)
    again = [a if a != files["train"] else reordered for a in args]
    capsys.readouterr()
    assert train.main([*again, "--output", str(resumed), "--resume"]) == 2
    assert "holds a model of other data or options (tasks" in capsys.readouterr().err
    # a run of fitted IWN statistics does not go on with batch statistics
    batch_statistics = ["--iwn-statistics", "batch"]
    assert train.main([*args, "--output", str(resumed), "--resume", *batch_statistics]) == 2
    assert "was trained with --iwn-statistics fit, this run has batch" in capsys.readouterr().err


def test_the_sampler_pass_is_the_epoch():
    """set_epoch(e) gives the order of the (e + 1)-th pass; the trainer's
    callback sets it from the state's epoch (data-parallel, accelerate's
    wrappers keep Trainer's own set_epoch from the sampler)."""
    from types import SimpleNamespace

    from transformers import TrainerState

    from surgellm_kernels.surgellm.trainer import TaskHomogeneousSampler, _SamplerEpoch

    tasks = [0] * 10 + [1] * 7
    whole = TaskHomogeneousSampler(tasks, 4, seed=3)  # its passes in turn
    orders = [list(whole) for _ in range(3)]
    assert orders[0] != orders[1] != orders[2]
    for epoch, state_epoch in ((2, 2.0), (1, 1.5), (0, 0.0)):
        sampler = TaskHomogeneousSampler(tasks, 4, seed=3)
        _SamplerEpoch(SimpleNamespace(task_sampler=sampler)).on_epoch_begin(
            None, TrainerState(epoch=state_epoch), None
        )
        assert list(sampler) == orders[epoch], (epoch, state_epoch)


def test_data_seed_orders_the_data_as_in_trainer():
    from types import SimpleNamespace

    import datasets

    from surgellm_kernels.surgellm.trainer import SurgeLLMTrainer, TaskHomogeneousSampler

    tasks = [0] * 10 + [1] * 7

    def order(seed, data_seed):
        args = SimpleNamespace(
            per_device_train_batch_size=4, world_size=1, seed=seed, data_seed=data_seed
        )
        fake = SimpleNamespace(
            args=args, train_dataset=datasets.Dataset.from_dict({"task_ids": tasks})
        )
        return list(SurgeLLMTrainer._get_train_sampler(fake))

    assert order(0, None) == list(TaskHomogeneousSampler(tasks, 4, seed=0))
    assert order(0, 5) == list(TaskHomogeneousSampler(tasks, 4, seed=5)) != order(0, None)
    assert order(1, 5) == order(0, 5)
    from surgellm_kernels.surgellm.trainer import check_training_arguments

    with pytest.raises(ValueError, match=r"data_seed must be in \[0, 2\*\*32\), got 4294967296"):
        check_training_arguments(SimpleNamespace(data_seed=2**32))


# -- metrics --------------------------------------------------------------------------------
def test_task_metrics_per_task_hand_computed():
    """scikit-learn's macro-F1 and accuracy per task, the mean over the tasks
    present, in task order."""
    predictions = [0, 0, 1, 1, 0, 0, 1, 0]
    labels = [0, 0, 0, 1, 1, 2, 1, 0]
    task_ids = [0, 0, 0, 0, 0, 0, 2, 2]
    metrics = task_metrics(predictions, labels, task_ids, ["a", "b", "c"])
    assert list(metrics["tasks"]) == ["a", "c"]  # b has no rows
    # task a: class 0: tp 2, fp 2, fn 1 -> 4/7; class 1: tp 1, fp 1, fn 1 -> 1/2; class 2: 0
    assert metrics["tasks"]["a"] == {
        "macro_f1": pytest.approx((4 / 7 + 1 / 2) / 3),
        "accuracy": pytest.approx(3 / 6),
        "n": 6,
    }
    assert metrics["tasks"]["c"] == {"macro_f1": 1.0, "accuracy": 1.0, "n": 2}
    assert metrics["macro_f1"] == pytest.approx(((4 / 7 + 1 / 2) / 3 + 1) / 2)
    with pytest.raises(ValueError, match="no examples"):
        task_metrics([], [], [], ["a"])
    # a row of no task would be left out of every task's figures
    for bad, shown in (([0, 3], "task_ids.1.=3"), ([0, -1], "task_ids.1.=-1"), ([0, 0.7], "float")):
        with pytest.raises(ValueError, match=r"task_ids must be task indices in \[0, 3\), got "):
            task_metrics([0, 1], [0, 1], bad, ["a", "b", "c"])
        with pytest.raises(ValueError, match=shown):
            task_metrics([0, 1], [0, 1], bad, ["a", "b", "c"])
    with pytest.raises(ValueError, match="must have one length, got 3, 2 and 2"):
        task_metrics([0, 1, 1], [0, 1], [0, 0], ["a", "b", "c"])


def test_full_eval_in_bfloat16_saves_the_model_as_trained(files, tmp_path):
    """--bf16-full-eval casts the model for the evaluation after training:
    the saved model is the float32 one trained, as its checkpoint is."""
    from safetensors import safe_open

    out = tmp_path / "out"
    args = ["--encoder", files["encoder"], "--train", files["train"], "--output", str(out)]
    args += ["--max-steps", "2", "--batch-size", "8", "--max-length", "64"]
    assert train.main([*args, "--bf16-full-eval", "true", "--use-cpu", "true"]) == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert {d for d in dtypes if d.is_floating_point} == {torch.float32}
    with open(out / "config.json") as f:
        assert json.load(f).get("dtype", "float32") == "float32"
