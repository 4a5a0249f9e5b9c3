"""Convergence, through Trainer: the reference model and its patched copy
(fused modules) train 30 steps side by side on a tiny encoder, float32,
dropout on (the same masks for both); every logged loss and every parameter
and buffer at the end agree to about 1e-5."""

import copy

import pytest
import torch

from surgellm_kernels import FusedInstanceWeightedNorm, backends, patch_model

from _helpers import assert_close
from _tiny_encoder import TASKS, synthetic_examples, tiny_bert, write_tokenizer

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
STEPS = 30
# Tiny synthetic batches leave many (task, feature) pairs without spread in
# a class: fit_statistics says so (tested where it is the point).
pytestmark = pytest.mark.filterwarnings("ignore:fit_statistics.*no spread:RuntimeWarning")


def _train(model, processor, data, output_dir, statistics):
    from surgellm_kernels.surgellm.trainer import (
        FitIWNStatistics,
        SurgeLLMTrainer,
        SurgeLLMTrainingArguments,
    )

    args = SurgeLLMTrainingArguments(
        output_dir=str(output_dir),
        max_steps=STEPS,
        per_device_train_batch_size=16,
        learning_rate=1e-3,
        warmup_steps=0.1,
        logging_steps=1,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
        disable_tqdm=True,
        seed=3,
        use_cpu=True,
    )
    callbacks = [FitIWNStatistics(data, 16)] if statistics == "fitted" else []
    trainer = SurgeLLMTrainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=transformers.DataCollatorWithPadding(processor.tokenizer),
        callbacks=callbacks,
    )
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


@pytest.mark.parametrize("statistics", ["fitted", "batch"])
def test_patched_model_trains_like_reference(tmp_path, statistics):
    from surgellm_kernels.surgellm import SurgeLLMForSequenceClassification, SurgeLLMProcessor

    write_tokenizer(str(tmp_path / "tokenizer"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    torch.manual_seed(1)
    reference = SurgeLLMForSequenceClassification.from_encoder(
        tiny_bert(len(tokenizer)), TASKS, tokenizer=tokenizer
    )
    processor = SurgeLLMProcessor(tokenizer, reference.config)
    texts, tasks, labels = synthetic_examples(480, seed=4)
    rows = datasets.Dataset.from_dict({"text": texts, "task": tasks})
    data = processor.map(rows, labels)
    patched = copy.deepcopy(reference)
    report = patch_model(patched)
    assert isinstance(patched.surgellm.iwn, FusedInstanceWeightedNorm)
    if backends("cpu")["cpu"].available:
        assert not report.eager, report

    losses = [
        _train(model, processor, data, tmp_path / name, statistics)
        for model, name in ((reference, "reference"), (patched, "patched"))
    ]
    assert len(losses[0]) == STEPS
    for step, (expected, actual) in enumerate(zip(*losses)):
        assert actual == pytest.approx(expected, rel=1e-5, abs=1e-6), step
    if statistics == "fitted":
        assert reference.surgellm.iwn._frozen and patched.surgellm.iwn._frozen
    for (name, p), (_, q) in zip(reference.named_parameters(), patched.named_parameters()):
        if name.endswith("attention.self.key.bias"):
            # Its gradient is 0 in exact arithmetic (softmax over keys is
            # shift-invariant), so AdamW turns rounding noise into full steps
            # in both models alike: nothing to compare.
            continue
        assert_close(q, p, name=name)
    for (name, b), (_, c) in zip(reference.named_buffers(), patched.named_buffers()):
        if b.is_floating_point():
            assert_close(c, b, name=name)
        else:
            assert torch.equal(c, b), name
