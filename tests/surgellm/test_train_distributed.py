"""The training command under torchrun: 2 ranks (gloo, CPU) of batch 8 take
the steps one process of batch 16 takes -- the same losses and gradient
norms step by step, the same IWN statistics (fitted, or class-balanced batch
statistics synced across the ranks) and the same weights after."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from _tiny_encoder import TASKS, synthetic_examples, tiny_bert, write_tokenizer

pytest.importorskip("transformers")
pytest.importorskip("datasets")  # the commands read their data with it
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = [
    pytest.mark.slow,  # two training runs per case, one of them on 2 ranks
    pytest.mark.skipif(
        shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
        reason="torchrun is not installed",
    ),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    tokenizer = write_tokenizer(str(root / "encoder"))
    # no dropout: the ranks draw other masks than one process would
    tiny_bert(
        len(tokenizer), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    ).save_pretrained(str(root / "encoder"))
    texts, tasks, labels = synthetic_examples(160, seed=5)
    with open(root / "train.jsonl", "w") as f:
        for text, task, label in zip(texts, tasks, labels):
            f.write(json.dumps({"text": text, "task": task, "label": TASKS[task][label]}) + "\n")
    return root


def _train(files, name, statistics, ranks):
    out = files / f"{name}-{statistics}"
    args = [
        "-m",
        "surgellm_kernels.train",
        "--encoder",
        files / "encoder",
        "--train",
        files / "train.jsonl",
        "--output",
        out,
        "--max-steps",
        "4",
        "--logging-steps",
        "1",
        "--save-strategy",
        "no",
        "--eval-strategy",
        "no",
        "--load-best-model-at-end",
        "false",
        "--disable-tqdm",
        "true",
        "--max-length",
        "64",
        "--iwn-statistics",
        statistics,
        "--config-overrides",
        "head_dropout=0,head_hidden_dropout=0",
        "--batch-size",
        str(16 // ranks),
    ]
    launcher = (
        [
            os.path.join(os.path.dirname(sys.executable), "torchrun"),
            "--standalone",
            "--nproc-per-node",
            str(ranks),
        ]
        if ranks > 1
        else [sys.executable]
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [*launcher, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    with open(out / "trainer_state.json") as f:
        logs = [log for log in json.load(f)["log_history"] if "loss" in log]
    synced = "iwn: statistics over the global batch of 2 ranks (the fused synchronized layer)"
    assert (synced in done.stdout) == (ranks > 1), done.stdout[-4000:]
    return logs, load_file(out / "model.safetensors")


@pytest.mark.parametrize("statistics", ["fit", "batch"])
def test_two_ranks_take_the_steps_of_one_process(files, statistics):
    one_logs, one = _train(files, "one", statistics, 1)
    two_logs, two = _train(files, "two", statistics, 2)
    assert len(one_logs) == len(two_logs) == 4
    for a, b in zip(one_logs, two_logs):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3), (a, b)
    assert one.keys() == two.keys()
    for key in ("surgellm.iwn.running_mean", "surgellm.iwn.running_std"):
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    if statistics == "batch":  # the running statistics moved: the synced path ran
        assert not torch.equal(
            one["surgellm.iwn.running_mean"], torch.zeros_like(one["surgellm.iwn.running_mean"])
        )
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
