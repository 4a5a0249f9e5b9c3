"""The SURGELLM transformers models on a tiny local BERT: save / load (Auto
classes, dtype, nothing at random), patching, torch.compile, autocast, the
ablations, the prefix and its embeddings, input errors."""

import copy
import json
import os
import re

import numpy as np
import pytest
import torch

from surgellm_kernels import (
    FusedInstanceWeightedNorm,
    FusedSurgicalGate,
    LexicalFeaturizer,
    backends,
    patch_model,
)
from surgellm_kernels.surgellm import (
    SurgeLLMConfig,
    SurgeLLMForSequenceClassification,
    SurgeLLMModel,
    SurgeLLMProcessor,
)
from surgellm_kernels.surgellm.modeling_surgellm import UngatedFusion

from _helpers import assert_close
from _tiny_encoder import TASKS, synthetic_examples, tiny_bert, write_tokenizer

transformers = pytest.importorskip("transformers")
BATCH = 16
# Tiny synthetic batches leave many (task, feature) pairs without spread in
# a class: fit_statistics says so (tested where it is the point).
pytestmark = pytest.mark.filterwarnings("ignore:fit_statistics.*no spread:RuntimeWarning")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tokenizer"))
    write_tokenizer(directory)
    return directory


def make_model(tokenizer_dir, seed=0, tasks=TASKS, **options):
    """(model, processor) on a tiny random BERT; a fresh tokenizer each time
    (from_encoder adds the prefix tokens to it)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    encoder = tiny_bert(len(tokenizer), seed)
    torch.manual_seed(seed + 1)
    model = SurgeLLMForSequenceClassification.from_encoder(
        encoder, tasks, tokenizer=tokenizer, **options
    )
    return model, SurgeLLMProcessor(tokenizer, model.config)


def make_batches(processor, steps, seed=0, size=BATCH):
    texts, tasks, labels = synthetic_examples(steps * size, seed)
    return [
        processor(texts[i : i + size], tasks[i : i + size], labels[i : i + size])
        for i in range(0, steps * size, size)
    ]


def finite_logits_close(actual, expected, dtype=torch.float32, scale=1.0):
    assert torch.equal(torch.isinf(actual), torch.isinf(expected))
    finite = torch.isfinite(expected)
    assert_close(actual[finite], expected[finite], dtype, scale)


def assert_fast_path(report):
    """A swapped module running the eager reference where the CPU kernel
    exists means the fused path was not taken: fail."""
    if backends("cpu")["cpu"].available:
        assert not report.eager, f"fused modules run the eager reference:\n{report}"


def test_patch_model_swaps_the_models_modules(tokenizer_dir):
    model, processor = make_model(tokenizer_dir)
    report = patch_model(model)
    assert sorted(report.backends) == ["surgellm.fusion", "surgellm.iwn"]
    assert isinstance(model.surgellm.iwn, FusedInstanceWeightedNorm)
    assert isinstance(model.surgellm.fusion, FusedSurgicalGate)
    assert_fast_path(report)


# -- saving, the Auto classes --------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_and_load_in_a_fresh_process(tokenizer_dir, tmp_path, dtype):
    """save_pretrained -> from_pretrained through the Auto classes in another
    process: identical logits, the dtype kept (dtype="auto"), no weight
    missing or unexpected (so nothing initialised at random), the IWN
    statistics fitted, the class names and the tokenizer's prefix tokens."""
    import subprocess
    import sys

    model, processor = make_model(tokenizer_dir)
    batch = make_batches(processor, 1)[0]
    model.fit_statistics([batch])
    model = model.to(dtype).eval()
    expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    torch.save({"batch": dict(batch), "logits": expected}, tmp_path / "expected.pt")
    files = sorted(os.listdir(tmp_path))
    assert "config.json" in files and "model.safetensors" in files
    script = f"""
import torch, surgellm_kernels.surgellm as S
from transformers import AutoModelForSequenceClassification
model, info = AutoModelForSequenceClassification.from_pretrained(
    {str(tmp_path)!r}, dtype="auto", output_loading_info=True)
assert type(model).__name__ == "SurgeLLMForSequenceClassification", type(model)
assert not any(info.values()), info
assert model.dtype == {dtype}, model.dtype
assert model.surgellm.iwn._frozen and model.config.class_names == {TASKS!r}
saved = torch.load({str(tmp_path / "expected.pt")!r})
processor = S.SurgeLLMProcessor.from_pretrained({str(tmp_path)!r})
texts = ["great film !", "maybe i think"]
again = processor(texts, ["sentiment", "authorship"])
assert again["input_ids"][0, 1] == processor.tokenizer.convert_tokens_to_ids("[TASK:sentiment")
assert torch.equal(model.eval()(**saved["batch"]).logits, saved["logits"])
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_fused_and_reference_load_each_others_weights(tokenizer_dir, tmp_path):
    model, processor = make_model(tokenizer_dir)
    batch = make_batches(processor, 1)[0]
    model.fit_statistics([batch])
    model.eval()
    expected = model(**batch).logits
    model.save_pretrained(tmp_path / "reference")
    fused = SurgeLLMForSequenceClassification.from_pretrained(tmp_path / "reference").eval()
    assert_fast_path(patch_model(fused))
    finite_logits_close(fused(**batch).logits, expected)
    fused.save_pretrained(tmp_path / "fused")
    back = SurgeLLMForSequenceClassification.from_pretrained(tmp_path / "fused").eval()
    assert type(back.surgellm.fusion).__name__ == "SurgicalGate"
    assert torch.equal(back(**batch).logits, expected)


def test_base_model_loads_from_the_classifier(tokenizer_dir, tmp_path):
    model, processor = make_model(tokenizer_dir)
    batch = make_batches(processor, 1)[0]
    model.fit_statistics([batch])
    model.eval()
    z = model.surgellm(**{k: v for k, v in batch.items() if k != "labels"}).pooler_output
    model.save_pretrained(tmp_path)
    base = transformers.AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(base, SurgeLLMModel)
    assert torch.equal(base(**{k: v for k, v in batch.items() if k != "labels"}).pooler_output, z)


def test_config_round_trip_keeps_task_order():
    config = SurgeLLMConfig(
        encoder_config=transformers.BertConfig(hidden_size=8),
        tasks={"zeta": 2, "alpha": 3},
        max_seq_length=64,
    )
    again = SurgeLLMConfig.from_dict(config.to_dict())
    assert again.task_names == ["zeta", "alpha"] and again.max_seq_length == 64
    assert isinstance(again.encoder_config, transformers.BertConfig)
    assert transformers.AutoConfig.for_model("surgellm").__class__ is SurgeLLMConfig


def test_config_refuses_a_name_given_twice_in_pairs():
    """tasks and lexicon groups as [name, value] pairs (config.json's form):
    a name given twice kept the last one, without a word."""
    with pytest.raises(ValueError, match="tasks name 'a' more than once"):
        SurgeLLMConfig(tasks=[["a", 2], ["a", 3]])
    with pytest.raises(ValueError, match="lexicon groups name 'g' more than once"):
        SurgeLLMConfig(lexicon={"groups": [["g", ["x"]], ["g", ["y"]]]})
    assert SurgeLLMConfig(tasks=[["b", 2], ["a", 3]]).task_names == ["b", "a"]


def test_label_maps_describe_the_logits_and_others_are_refused(tokenizer_dir, tmp_path):
    """num_labels / id2label / label2id name the logits' columns (the most
    classes of a task); from_pretrained(num_labels=7), (id2label=...) or
    (problem_type="regression") built the saved heads and cross-entropy and
    ignored them, without a word."""
    model, _ = make_model(tokenizer_dir)
    width = max(model.config.tasks.values())
    assert model.config.num_labels == width
    assert model.config.id2label == {i: f"LABEL_{i}" for i in range(width)}
    model.save_pretrained(tmp_path)
    auto = transformers.AutoModelForSequenceClassification
    assert auto.from_pretrained(tmp_path, num_labels=width).config.num_labels == width
    for wrong, named in (
        (dict(num_labels=width + 4), f"num_labels={width + 4}"),
        (dict(id2label={i: "c" for i in range(width)}), "id2label="),
        (dict(label2id={"x": 0}), "label2id="),
        (dict(problem_type="regression"), "problem_type='regression'"),
    ):
        with pytest.raises(ValueError, match=f"{re.escape(named)}.*Leave num_labels"):
            auto.from_pretrained(tmp_path, **wrong)
    encoder = model.config.encoder_config
    for bad in (dict(num_labels=2), dict(id2label={"x": "y"}), dict(label2id=["a"])):
        with pytest.raises(ValueError, match="Leave num_labels, id2label"):
            SurgeLLMConfig(encoder_config=encoder, tasks={"a": 3}, **bad)
    # a generic map of another length, an older save's default, is taken so
    legacy = {**model.config.to_dict(), "id2label": {"0": "LABEL_0", "1": "LABEL_1"}}
    legacy.pop("label2id")
    assert SurgeLLMConfig.from_dict(legacy).num_labels == width
    # a config changed after it was built is not saved
    model.config.id2label = {0: "x"}
    with pytest.raises(ValueError, match="num_labels=1|id2label="):
        model.save_pretrained(tmp_path / "again")
    assert not (tmp_path / "again" / "config.json").exists()
    # one task: the columns are its classes, by name
    single = SurgeLLMConfig(
        encoder_config=encoder, tasks={"mood": 2}, class_names={"mood": ["sad", "glad"]}
    )
    assert single.id2label == {0: "sad", 1: "glad"} and single.label2id["glad"] == 1
    again = SurgeLLMConfig.from_dict(json.loads(single.to_json_string()))
    assert again.id2label == single.id2label


def test_model_with_its_own_word_lists(tokenizer_dir, tmp_path):
    """A lexicon with two more groups: 18 features (IWN, gate, prefix fields),
    saved with the model and restored by from_pretrained."""
    lexicon = LexicalFeaturizer().with_groups(
        {"films": ["film", "movie"], "praise": ["great", "fine"]}
    )
    model, processor = make_model(tokenizer_dir, lexicon=lexicon)
    assert processor.featurizer == lexicon and model.config.lexicon == lexicon.to_dict()
    assert model.surgellm.iwn.num_features == 18
    assert model.surgellm.fusion.feature_projection.in_features == 18
    batch = processor(["great film, fine movie !"], ["sentiment"])
    assert batch["features"][0, 10:12].tolist() == [2, 2]
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    assert [tokens[2 + 2 * j] for j in range(18)] == [f"|F{j}:" for j in range(1, 19)]
    batches = make_batches(processor, 1)
    model.fit_statistics(batches)
    model.eval()
    expected = model(**batches[0]).logits
    model.save_pretrained(tmp_path)
    loaded = SurgeLLMForSequenceClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.featurizer() == lexicon
    assert torch.equal(loaded(**batches[0]).logits, expected)
    with pytest.raises(ValueError, match=r"groups\['x'\] must be a non-empty list"):
        make_model(tokenizer_dir, lexicon={"groups": {"x": []}})


def test_from_encoder_loads_a_local_path(tmp_path):
    encoder_dir = tmp_path / "encoder"
    tokenizer = write_tokenizer(str(encoder_dir))
    tiny_bert(len(tokenizer)).save_pretrained(str(encoder_dir))
    tokenizer = transformers.AutoTokenizer.from_pretrained(encoder_dir)
    model = SurgeLLMForSequenceClassification.from_encoder(
        str(encoder_dir), {"a": 2, "b": 3}, tokenizer=tokenizer
    )
    assert model.config.tasks == {"a": 2, "b": 3} and model.config.class_names is None
    processor = SurgeLLMProcessor(tokenizer, model.config)
    out = model(**processor(["great film", "maybe"], ["a", "b"], labels=[1, 2]))
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        SurgeLLMForSequenceClassification.from_encoder(str(tmp_path / "typo"), {"a": 2})


@pytest.mark.parametrize("spare_rows", [0, 64])
def test_prefix_tokens_start_from_their_pieces(tokenizer_dir, spare_rows):
    """Each added token's embedding is the mean of the encoder's embeddings
    of the pieces its text splits into; no other row changes. With spare
    rows past the vocabulary (as OPT and Qwen2 keep) the new ids fall in
    them, and are set all the same."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = len(tokenizer)
    encoder = tiny_bert(vocab + spare_rows)
    before = encoder.get_input_embeddings().weight.detach().clone()
    pieces = tokenizer("[TASK:sentiment", add_special_tokens=False)["input_ids"]
    model = SurgeLLMForSequenceClassification.from_encoder(encoder, TASKS, tokenizer=tokenizer)
    after = model.get_input_embeddings().weight.detach()
    assert torch.equal(after[:vocab], before[:vocab])
    new = tokenizer.convert_tokens_to_ids("[TASK:sentiment")
    assert new >= vocab and len(pieces) > 1
    assert_close(after[new], before[pieces].mean(0))


def test_a_reused_tokenizer_gives_a_fresh_encoder_the_same_prefix_rows(tokenizer_dir):
    """The tokenizer already holds the prefix tokens (grown for another
    model): the new encoder's rows still start from the pieces' mean (they
    were left at their random initialization)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    SurgeLLMForSequenceClassification.from_encoder(
        tiny_bert(len(tokenizer)), TASKS, tokenizer=tokenizer
    )
    fresh_tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    pieces = fresh_tokenizer("[TASK:sentiment", add_special_tokens=False)["input_ids"]
    encoder = tiny_bert(len(fresh_tokenizer), seed=3)
    before = encoder.get_input_embeddings().weight.detach().clone()
    model = SurgeLLMForSequenceClassification.from_encoder(encoder, TASKS, tokenizer=tokenizer)
    new = tokenizer.convert_tokens_to_ids("[TASK:sentiment")
    assert_close(model.get_input_embeddings().weight[new], before[pieces].mean(0))


def test_a_tokenizer_without_the_prefix_tokens_is_refused(tokenizer_dir, tmp_path):
    model, _ = make_model(tokenizer_dir)
    fresh = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    with pytest.raises(ValueError, match=r"tokenizer lacks \d+ of the model's prefix tokens"):
        SurgeLLMProcessor(fresh, model.config)
    # a model saved with such a tokenizer was trained on the pieces: read so, with a warning
    model.save_pretrained(tmp_path)
    fresh.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="trained with each marker cut into pieces"):
        SurgeLLMProcessor.from_pretrained(tmp_path)


# -- torch.compile, autocast ------------------------------------------------------------
def test_patched_compiled_model_matches_eager(tokenizer_dir):
    model, processor = make_model(tokenizer_dir)
    batches = make_batches(processor, 2)
    model.fit_statistics(batches)
    assert_fast_path(patch_model(model))
    model.eval()
    compiled = torch.compile(model, fullgraph=True)
    for batch in batches:
        expected = model(**batch)
        actual = compiled(**batch)
        finite_logits_close(actual.logits, expected.logits, scale=10)
        assert_close(actual.loss, expected.loss, scale=10)


@pytest.mark.parametrize("kernels", ["reference", "fused"])
def test_autocast_bfloat16_cpu(tokenizer_dir, kernels):
    model, processor = make_model(tokenizer_dir)
    batch = make_batches(processor, 1)[0]
    model.fit_statistics([batch])
    if kernels == "fused":
        assert_fast_path(patch_model(model))
    model.eval()  # no dropout: the two passes see the same network
    expected = model(**batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
    out.loss.backward()
    assert out.loss.dtype == torch.float32
    finite_logits_close(out.logits.float(), expected.logits, torch.bfloat16, scale=4)
    assert_close(out.loss, expected.loss, torch.bfloat16)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_cuda(tokenizer_dir, dtype):
    model, processor = make_model(tokenizer_dir)
    batch = make_batches(processor, 1)[0]
    model.fit_statistics([batch])
    model = model.cuda().eval()
    assert_fast_path(patch_model(model))
    batch = {k: v.cuda() for k, v in batch.items()}
    expected = model(**batch)
    with torch.autocast("cuda", dtype=dtype):
        out = model(**batch)
    out.loss.backward()
    finite_logits_close(out.logits.float(), expected.logits, dtype, scale=4)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_fit_statistics_names_what_is_missing(tokenizer_dir):
    model, processor = make_model(tokenizer_dir)
    texts, tasks, labels = synthetic_examples(48)
    sentiment = [i for i, t in enumerate(tasks) if t == "sentiment"]
    batch = processor(*([v[i] for i in sentiment] for v in (texts, tasks, labels)))
    with pytest.warns(RuntimeWarning, match="no rows of task.* authorship, reasoning"):
        model.fit_statistics([batch])
    iwn = model.surgellm.iwn
    assert torch.equal(iwn.running_std[1], torch.ones_like(iwn.running_std[1]))
    with pytest.raises(ValueError, match="batches hold no rows"):
        model.fit_statistics([])
    with pytest.raises(ValueError, match=r"batches\[0\] has no labels"):
        model.fit_statistics([processor(texts[:4], tasks[:4])])
    # a failed call leaves the module's fit state as it was
    bad = dict(batch, labels=batch["labels"][:2])
    iwn.partial_fit(batch["features"][:3], batch["labels"][:3], batch["task_ids"][:3])
    before = [t.clone() for t in iwn._fit_state]  # not what fit_statistics starts with
    with pytest.raises(ValueError, match="labels must have shape"):
        model.fit_statistics([batch, bad])
    assert all(torch.equal(a, b) for a, b in zip(iwn._fit_state, before))


# -- ablations --------------------------------------------------------------------------
@pytest.mark.parametrize("component", ["iwn", "gate", "prefix"])
def test_ablations(tokenizer_dir, component):
    model, processor = make_model(tokenizer_dir, **{component: False})
    batch = make_batches(processor, 1)[0]
    if component == "iwn":
        assert model.surgellm.iwn is None
        assert not any(".iwn." in k for k in model.state_dict())
        with pytest.raises(RuntimeError, match="iwn=False"):
            model.fit_statistics([batch])
    else:
        model.fit_statistics([batch])
    if component == "gate":
        assert isinstance(model.surgellm.fusion, UngatedFusion)
    if component == "prefix":
        base = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
        assert len(processor.tokenizer) == len(base)
        plain = base(synthetic_examples(1)[0][0], return_tensors="pt")["input_ids"][0]
        assert torch.equal(batch["input_ids"][0, : len(plain)], plain)
    else:
        first = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0][:3].tolist())
        assert first[1].startswith("[TASK:") and first[2] == "|F1:"
    report = patch_model(model)
    expected = {
        "iwn": ["surgellm.fusion"],
        "gate": ["surgellm.iwn"],
        "prefix": ["surgellm.fusion", "surgellm.iwn"],
    }[component]
    assert sorted(report.backends) == expected
    model.train()
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)


# -- inputs -----------------------------------------------------------------------------
def test_prefix_tokens_and_features(tokenizer_dir):
    _, processor = make_model(tokenizer_dir)
    text = "I think this film was great! 3 times?"
    batch = processor([text], ["sentiment"])
    tokens = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    # [CLS] [TASK:sentiment |F1: 1 ... |F16: 1 ] text... [SEP]
    assert tokens[1] == "[TASK:sentiment"
    assert [tokens[2 + 2 * j] for j in range(16)] == [f"|F{j}:" for j in range(1, 17)]
    assert tokens[2 + 2 * 15 + 1] == "1" and tokens[34] == "]" and tokens[35] == "i"
    assert batch["features"].shape == (1, 16) and batch["task_ids"].tolist() == [0]


def test_truncation_keeps_the_prefix(tokenizer_dir):
    _, processor = make_model(tokenizer_dir, max_seq_length=40)
    batch = processor(["great " * 100], ["sentiment"])
    assert batch["input_ids"].shape[1] == 40
    # features come from the full text, before truncation
    assert batch["features"][0, 10] == 100
    _, short = make_model(tokenizer_dir, max_seq_length=30)
    with pytest.raises(ValueError, match="max_seq_length=30 cannot hold the task prefix"):
        short(["great"], ["sentiment"])


def test_input_errors(tokenizer_dir):
    model, processor = make_model(tokenizer_dir)
    with pytest.raises(ValueError, match=r"tasks\[1\]: unknown task 'nope'"):
        processor(["a", "b"], ["sentiment", "nope"])
    with pytest.raises(ValueError, match=r"labels\[1\]=2 is not a class of task 'authorship'"):
        processor(["a", "b"], ["sentiment", "authorship"], labels=[0, 2])
    with pytest.raises(ValueError, match="texts and tasks must be sequences of one length"):
        processor(["a", "b"], ["sentiment"])
    # task ids as a tensor or numpy integers, as names; never a bool or a float
    assert processor.task_ids(torch.tensor([2, 0])).tolist() == [2, 0]
    assert processor.task_ids(np.array([1])).tolist() == [1]
    for bad in (torch.tensor([True]), [1.0], torch.tensor([3])):
        with pytest.raises(ValueError, match=r"tasks\[0\] must be a task name or an id"):
            processor.task_ids(bad)
    with pytest.raises(TypeError, match="labels must be integer class ids, got torch.float32"):
        processor(["a", "b"], ["sentiment", "authorship"], labels=[0.7, 1.2])
    with pytest.raises(TypeError, match="labels must be integer class ids, got torch.bool"):
        processor(["a", "b"], ["sentiment", "authorship"], labels=torch.tensor([True, False]))
    for bools in ([True, False], [True, 1]):  # as_tensor made [True, 1] int64: class 1
        with pytest.raises(TypeError, match="labels must be integer class ids, got a bool"):
            processor(["a", "b"], ["sentiment", "authorship"], labels=bools)
    batch = processor(["a", "b"], ["sentiment", "authorship"], labels=[0, 1])
    batch["labels"] = torch.tensor([0, 5])
    with pytest.raises(ValueError, match=r"labels\[1\]=5"):
        model(**batch)
    # a task id past the task list, with labels (checked per task) and without
    # (the gate's embedding), and with the gate ablated
    batch["labels"], batch["task_ids"] = torch.tensor([0, 1]), torch.tensor([0, 3])
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 3\), got values in \[0, 3\]"):
        model(**batch)
    batch["task_ids"] = torch.tensor([0.0, 1.0])
    with pytest.raises(TypeError, match="task_ids must be an int64"):
        model(**batch)
    ungated, _ = make_model(tokenizer_dir, gate=False)
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    for m in (model, ungated):
        unlabelled["task_ids"] = torch.tensor([-1, 1])
        with pytest.raises(ValueError, match=r"lie in \[0, 3\), got values in \[-1, 1\]"):
            m.eval()(**unlabelled)
    batch["task_ids"] = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="task_ids and features are required"):
        model(**{k: v for k, v in batch.items() if k != "task_ids"})
    encoder, tokenizer = model.surgellm.encoder, processor.tokenizer
    with pytest.raises(ValueError, match="number of classes >= 2"):
        SurgeLLMForSequenceClassification.from_encoder(encoder, {"x": 1}, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="task names"):
        SurgeLLMForSequenceClassification.from_encoder(encoder, {"a b": 2}, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="tokenizer is required"):
        SurgeLLMForSequenceClassification.from_encoder(encoder, {"a": 2})
    with pytest.raises(ValueError, match="max_position_embeddings"):
        SurgeLLMForSequenceClassification.from_encoder(
            encoder, {"a": 2}, tokenizer=tokenizer, max_seq_length=1000
        )


def test_decode_names_classes(tokenizer_dir):
    model, processor = make_model(tokenizer_dir)
    batch = processor(["great film", "maybe i think"], ["sentiment", "authorship"])
    logits = model.eval()(**batch).logits
    predictions = processor.decode(logits, batch["task_ids"])
    assert predictions[0] in TASKS["sentiment"] and predictions[1] in TASKS["authorship"]
    assert processor.decode(logits, ["sentiment", "authorship"]) == predictions
    assert processor.decode(logits.detach().numpy(), batch["task_ids"]) == predictions
    with pytest.raises(ValueError, match=r"one task per row of logits \(2\), got 1"):
        processor.decode(logits, batch["task_ids"][:1])
    with pytest.raises(ValueError, match=r"tasks\[1\] must be a task name or an id in \[0, 3\)"):
        processor.decode(logits, torch.tensor([0, -1]))
    with pytest.raises(ValueError, match=r"logits must be the model's, of shape \(batch, 3\)"):
        processor.decode(logits[0], batch["task_ids"][0])


def test_task_names_that_are_not_attribute_names(tokenizer_dir):
    model, processor = make_model(tokenizer_dir, tasks={"sst.2": 2, "type": 3})
    out = model(**processor(["great", "maybe"], ["sst.2", "type"], labels=[1, 2]))
    assert torch.isfinite(out.loss) and [len(h[-1].bias) for h in model.heads] == [2, 3]


def test_reused_tokenizer_still_resizes_a_fresh_encoder(tokenizer_dir):
    model, processor = make_model(tokenizer_dir)
    # the tokenizer already holds the prefix tokens: a new encoder must grow too
    fresh = tiny_bert(len(transformers.AutoTokenizer.from_pretrained(tokenizer_dir)))
    again = SurgeLLMForSequenceClassification.from_encoder(
        fresh, TASKS, tokenizer=processor.tokenizer
    )
    assert again.get_input_embeddings().num_embeddings == len(processor.tokenizer)
    again.eval()(**processor(["great film"], ["sentiment"]))
    # no pooler: unused, and DDP wants no parameter without a gradient
    assert again.surgellm.encoder.pooler is None


def test_constant_feature_is_scaled_by_one(tokenizer_dir):
    model, processor = make_model(tokenizer_dir)
    batch = processor(["great film .", "dull film ."], ["sentiment", "sentiment"], labels=[1, 0])
    with pytest.warns(RuntimeWarning, match="no spread"):
        model.fit_statistics([batch])
    iwn = model.surgellm.iwn
    assert (iwn.running_std[0] > 0).all()
    model.eval()
    odd = processor(["what ? ! 7"], ["sentiment"])
    assert iwn(odd["features"], task_ids=odd["task_ids"]).abs().max() < 100


@pytest.mark.parametrize("head_learning_rate", [5e-3, None])
# the schedule is stepped alone on purpose, to read its learning rates
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`:UserWarning")
def test_optimizer_groups_encoder_and_fresh_parameters(tokenizer_dir, tmp_path, head_learning_rate):
    from surgellm_kernels.surgellm.trainer import SurgeLLMTrainer, SurgeLLMTrainingArguments

    model, _ = make_model(tokenizer_dir)
    args = SurgeLLMTrainingArguments(
        output_dir=str(tmp_path),
        learning_rate=1e-4,
        head_learning_rate=head_learning_rate,
        warmup_steps=2,
        eval_strategy="no",
        load_best_model_at_end=False,
        use_cpu=True,
    )
    trainer = SurgeLLMTrainer(model=model, args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = []
    for group in trainer.optimizer.param_groups:
        group_names = [names[id(p)] for p in group["params"]]
        seen += group_names
        if head_learning_rate is None:  # Trainer's groups, one rate
            assert group["initial_lr"] == 1e-4
        else:  # no group mixes the two kinds
            in_encoder = {n.startswith("surgellm.encoder.") for n in group_names}
            assert len(in_encoder) == 1, group_names
            assert group["initial_lr"] == (1e-4 if in_encoder.pop() else head_learning_rate)
        # decay except biases and norm weights, as Trainer groups them
        no_decay = {n.endswith("bias") or "norm" in n.lower() for n in group_names}
        assert no_decay == {group["weight_decay"] == 0.0}, group_names
    assert sorted(seen) == sorted(names.values())  # every parameter, once
    if head_learning_rate is not None:
        fresh = [n for n in seen if not n.startswith("surgellm.encoder.")]
        assert any(n.startswith("heads.") for n in fresh)
        assert any(n.startswith("surgellm.fusion.gate") for n in fresh)
        # the schedule scales both: half-way through the warm-up, half of each
        trainer.lr_scheduler.step()
        for group in trainer.optimizer.param_groups:
            assert group["lr"] == pytest.approx(group["initial_lr"] / 2)
        # an optimizer given to Trainer is left as it is
        given = torch.optim.SGD(model.parameters(), lr=0.1)
        trainer = SurgeLLMTrainer(model=model, args=args, optimizers=(given, None))
        trainer.create_optimizer_and_scheduler(num_training_steps=10)
        assert trainer.optimizer is given and len(given.param_groups) == 1
    else:
        assert SurgeLLMTrainingArguments(output_dir=str(tmp_path)).head_learning_rate == 3e-3


# -- what a transformers user expects of a sequence classifier -------------------------


def test_hidden_states_and_attentions_reach_the_output_as_in_bert(tokenizer_dir):
    """They were computed by the encoder and dropped: None where BERT's
    classifier returns them, from the call's flags or the config's."""
    model, processor = make_model(tokenizer_dir)
    model.config._attn_implementation = "eager"
    model.surgellm.encoder.config._attn_implementation = "eager"
    batch = make_batches(processor, 1)[0]
    model.fit_statistics([batch])
    model.eval()
    out = model(**batch, output_hidden_states=True, output_attentions=True)
    layers = model.config.encoder_config.num_hidden_layers
    assert len(out.hidden_states) == layers + 1 and len(out.attentions) == layers
    encoder_out = model.surgellm.encoder(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        output_hidden_states=True,
    )
    torch.testing.assert_close(out.hidden_states[-1], encoder_out.last_hidden_state)
    plain = model(**batch)
    assert plain.hidden_states is None and plain.attentions is None
    model.config.output_hidden_states = True  # the model's config, as BERT's
    assert len(model(**batch).hidden_states) == layers + 1
    model.config.output_hidden_states = False
    model.config.return_dict = False  # the config's choice, as transformers' models read it
    as_tuple = model(**batch)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[1], plain.logits)


def test_resized_embeddings_save_and_load(tokenizer_dir, tmp_path):
    """The encoder is built from encoder_config on loading: a resize that
    left its vocab_size behind made the saved model unloadable."""
    model, processor = make_model(tokenizer_dir)
    model.fit_statistics(make_batches(processor, 1))
    rows = model.get_input_embeddings().num_embeddings
    model.resize_token_embeddings(rows + 8)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert loaded.get_input_embeddings().num_embeddings == rows + 8
    torch.testing.assert_close(
        loaded.get_input_embeddings().weight, model.get_input_embeddings().weight
    )


def test_from_encoder_returns_the_model_in_eval_mode(tokenizer_dir):
    """As from_pretrained does: the encoder came back in eval mode (dropout
    off) inside a model in training mode."""
    model, _ = make_model(tokenizer_dir)
    assert not any(m.training for m in model.modules())


def test_a_label_the_check_does_not_see_is_not_ignored(tokenizer_dir):
    """Under torch.compile (and for GPU labels) the label check does not
    run; a -100 label was then dropped from the loss while its row still
    counted in its task's mean."""
    model, processor = make_model(tokenizer_dir)
    batch = make_batches(processor, 1)[0]
    model.fit_statistics([batch])
    labels = batch["labels"].clone()
    labels[1] = -100
    logits = model(**batch).logits
    with pytest.raises(IndexError, match="out of bounds"):
        model.loss(logits, labels, batch["task_ids"])


def test_a_label_of_a_padded_column_is_refused_under_compile(tokenizer_dir):
    """Where the label check does not run (torch.compile, GPU labels), a
    label past its task's class count but within the widest task's named a
    -inf column: an infinite loss. The assert in the graph refuses it (where
    Inductor keeps asserts: torch 2.13 lowers them to a device assert)."""
    import torch._inductor.lowering as lowering

    if not hasattr(lowering, "lower_assert_async"):
        pytest.skip("this torch's Inductor drops _assert_async")
    model, processor = make_model(tokenizer_dir)
    batch = make_batches(processor, 1)[0]
    model.fit_statistics([batch])
    model.eval()
    counts = torch.tensor(list(model.config.tasks.values()))
    row = int((counts[batch["task_ids"]] < counts.max()).nonzero()[0, 0])
    compiled = torch.compile(model)
    assert torch.isfinite(compiled(**batch).loss)
    labels = batch["labels"].clone()
    labels[row] = counts[batch["task_ids"][row]]  # a padded column
    with pytest.raises(RuntimeError, match="labels: a label is not a class of its row's task"):
        compiled(**{**batch, "labels": labels})


def test_the_label_assert_without_the_host_check():
    """What runs in the graph or on the device, here on CPU tensors (where
    _assert_async raises at once)."""
    from surgellm_kernels.surgellm.modeling_surgellm import _assert_labels_are_classes

    inf = float("-inf")
    logits = torch.tensor([[0.5, -1.0, inf], [0.1, 0.2, 0.3]])
    _assert_labels_are_classes(logits, torch.tensor([1, 2]))
    for labels in ([2, 0], [-1, 0], [0, 3]):  # a padded column, below 0, past the widest
        with pytest.raises(RuntimeError, match="labels: a label is not a class"):
            _assert_labels_are_classes(logits, torch.tensor(labels))


def test_label_smoothing_is_refused(tokenizer_dir, tmp_path):
    """Trainer's smoother averages over the -inf padding: an infinite loss,
    logged as 0."""
    from surgellm_kernels.surgellm.trainer import SurgeLLMTrainer, SurgeLLMTrainingArguments

    model, _ = make_model(tokenizer_dir)
    args = SurgeLLMTrainingArguments(
        output_dir=str(tmp_path), label_smoothing_factor=0.1, report_to="none"
    )
    with pytest.raises(ValueError, match="label_smoothing_factor=0.1 is not supported"):
        SurgeLLMTrainer(model=model, args=args)


def test_compute_metrics_without_task_ids_says_what_to_set():
    from transformers import EvalPrediction

    from surgellm_kernels.surgellm.trainer import compute_metrics_for

    metrics = compute_metrics_for(["a", "b"])
    prediction = EvalPrediction(predictions=np.zeros((2, 2)), label_ids=np.array([0, 1]))
    with pytest.raises(ValueError, match='label_names=\\["labels", "task_ids"\\]'):
        metrics(prediction)
    # a task whose metric names Trainer would take for the mean's (eval_macro_f1)
    for task in ("eval", "eval_b"):
        with pytest.raises(ValueError, match=f"task '{task}': Trainer reads metrics named eval"):
            compute_metrics_for(["a", task])


def test_a_label_past_its_tasks_classes_is_refused_by_fit_statistics(tokenizer_dir):
    # A third class of a two-class task would be averaged into its IWN
    # statistics as a class of its own.
    model, processor = make_model(tokenizer_dir)
    batch = processor(["a", "b", "c"], ["reasoning", "sentiment", "sentiment"], labels=[2, 0, 1])
    batch["labels"] = torch.tensor([2, 2, 1])  # reasoning has 3 classes, sentiment 2
    before = [t.clone() for t in model.surgellm.iwn.buffers()]
    with pytest.raises(ValueError, match=r"batches\[0\]: labels\[1\]=2 is not a class of task"):
        model.fit_statistics([batch])
    assert all(torch.equal(a, b) for a, b in zip(model.surgellm.iwn.buffers(), before))


def test_the_first_token_must_not_be_padding(tokenizer_dir):
    # SURGELLM reads each row's first token: padding there (a tokenizer
    # padding on the left) would be read, with no error from the encoder.
    model, processor = make_model(tokenizer_dir)
    texts, tasks = ["a fine film", "a much longer sentence about a film"], ["sentiment"] * 2
    processor.tokenizer.padding_side = "left"
    with pytest.raises(ValueError, match="pads on the left and truncates on the right"):
        processor(texts, tasks)
    processor.tokenizer.padding_side = "right"
    processor.tokenizer.truncation_side = "left"  # would cut the prefix off
    with pytest.raises(ValueError, match="truncates on the left"):
        processor(texts, tasks)
    processor.tokenizer.truncation_side = "right"
    batch = processor(texts, tasks)
    model.eval()(**batch)
    # left-padded by a collator, as transformers' pads for a left-padding tokenizer
    shift = int((batch["attention_mask"][0] == 0).sum())
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        batch[key][0] = batch[key][0].roll(shift)
    with pytest.raises(ValueError, match=r"first token is padding.*\(row 0\)"):
        model(**batch)


def test_labels_by_class_name(tokenizer_dir):
    model, processor = make_model(tokenizer_dir)
    names = processor(["a", "b"], ["reasoning", "sentiment"], labels=["chain", "negative"])
    assert names["labels"].tolist() == [2, 0]
    mixed = processor(["a", "b"], ["reasoning", "sentiment"], labels=[1, "positive"])
    assert mixed["labels"].tolist() == [1, 1]
    with pytest.raises(ValueError, match=r"labels\[1\]='chain' is not a class of task 'sentiment'"):
        processor(["a", "b"], ["reasoning", "sentiment"], labels=["chain", "chain"])


def test_from_pretrained_of_an_encoder_says_what_to_call(tmp_path):
    tiny_bert(40, 0).save_pretrained(tmp_path)
    for load in (SurgeLLMConfig.from_pretrained, SurgeLLMForSequenceClassification.from_pretrained):
        with pytest.raises(
            ValueError, match=r"a 'bert' model, not of a SURGELLM model.*from_encoder"
        ):
            load(str(tmp_path))


def test_from_encoder_takes_the_base_model_of_a_model_with_a_head(tokenizer_dir, tmp_path):
    """A BertForMaskedLM was kept whole: the first forward raised (its
    output has no last_hidden_state), and a saved model reloaded a random
    encoder (every weight name missing or unexpected)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    with_head = transformers.BertForMaskedLM(tiny_bert(len(tokenizer)).config)
    model = SurgeLLMForSequenceClassification.from_encoder(with_head, TASKS, tokenizer=tokenizer)
    assert model.surgellm.encoder is with_head.bert
    processor = SurgeLLMProcessor(tokenizer, model.config)
    batch = make_batches(processor, 1)[0]
    model.fit_statistics([batch])
    logits = model(**batch).logits
    model.save_pretrained(tmp_path)
    loaded, info = SurgeLLMForSequenceClassification.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not any(info.values()), info
    assert torch.equal(loaded(**batch).logits, logits)


def test_from_pretrained_checks_the_config_values_it_is_given(tokenizer_dir, tmp_path):
    """Keyword arguments are set on the loaded config past __init__'s
    checks: eps=-1 loaded (failing at the first forward) and tasks=...
    raised a bare KeyError."""
    model, _ = make_model(tokenizer_dir)
    model.save_pretrained(tmp_path)
    for auto in (transformers.AutoConfig, transformers.AutoModelForSequenceClassification):
        with pytest.raises(ValueError, match="eps must be a positive number"):
            auto.from_pretrained(tmp_path, eps=-1.0)
    with pytest.raises(ValueError, match="max_seq_length must be an int >= 2"):
        SurgeLLMConfig.from_pretrained(tmp_path, max_seq_length=1)
    with pytest.raises(ValueError, match="max_seq_length=257 exceeds the encoder's max_position"):
        transformers.AutoModelForSequenceClassification.from_pretrained(
            tmp_path, max_seq_length=257
        )  # a shape error at the first forward before
    with pytest.raises(ValueError, match=r"class_names names tasks that tasks does not: \['b'\]"):
        SurgeLLMConfig.from_pretrained(
            tmp_path, tasks={"a": 2}, class_names={"a": ["x", "y"], "b": ["x", "y"]}
        )
    with pytest.raises(ValueError, match=r"class_names\[.x.\] must list 2 distinct names"):
        SurgeLLMConfig.from_pretrained(tmp_path, tasks={"x": 2})
    assert SurgeLLMConfig.from_pretrained(tmp_path, eps=1e-3).eps == 1e-3
    # a subset of the tasks keeps their saved class names
    kept = SurgeLLMConfig.from_pretrained(tmp_path, tasks={"reasoning": 3, "sentiment": 2})
    assert kept.class_names == {k: TASKS[k] for k in ("reasoning", "sentiment")}
    # values __init__ takes, as it takes them; new tasks bring their label maps
    config = SurgeLLMConfig.from_pretrained(
        tmp_path, tasks=[["a", 4], ["b", 3]], class_names=None, iwn=0, lexicon=LexicalFeaturizer()
    )
    assert config.tasks == {"a": 4, "b": 3} and config.num_labels == 4
    assert config.iwn is False and config.lexicon == LexicalFeaturizer().to_dict()


def test_a_refused_tokenizer_is_left_as_it_was(tokenizer_dir):
    model, _ = make_model(tokenizer_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)  # no prefix tokens
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    with pytest.raises(ValueError, match="lacks"):
        SurgeLLMProcessor(tokenizer, model.config)
    assert (tokenizer.padding_side, tokenizer.truncation_side) == ("left", "left")


def test_the_attention_implementation_asked_for_reaches_the_encoder(tokenizer_dir, tmp_path):
    """attn_implementation="sdpa" was refused (the model declared no
    support), and the model's config said "eager" while its encoder ran sdpa."""
    model, processor = make_model(tokenizer_dir)
    batch = make_batches(processor, 1)[0]
    model.fit_statistics([batch])
    model.save_pretrained(tmp_path)
    auto = transformers.AutoModelForSequenceClassification
    logits = {}
    for implementation in ("sdpa", "eager"):
        loaded = auto.from_pretrained(tmp_path, attn_implementation=implementation)
        encoder_config = loaded.surgellm.encoder.config
        assert loaded.config._attn_implementation == implementation
        assert encoder_config._attn_implementation == implementation
        logits[implementation] = loaded(**batch).logits
    assert_close(logits["sdpa"], logits["eager"])
    loaded.set_attn_implementation("sdpa")
    assert loaded.surgellm.encoder.config._attn_implementation == "sdpa"


def test_the_config_names_the_attention_the_encoder_runs(tokenizer_dir):
    """The model's config said sdpa (its default) over an encoder with no
    sdpa, which ran eager; from_encoder set an encoder built with eager
    attention to sdpa."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    small = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    no_sdpa = transformers.DebertaV2Model(
        transformers.DebertaV2Config(vocab_size=len(tokenizer), **small)
    )
    assert not no_sdpa._supports_sdpa
    model = SurgeLLMForSequenceClassification.from_encoder(no_sdpa, TASKS, tokenizer=tokenizer)
    assert model.config._attn_implementation == "eager"
    assert SurgeLLMModel(model.config).config._attn_implementation == "eager"
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    encoder = tiny_bert(len(tokenizer))
    encoder.set_attn_implementation("eager")
    model = SurgeLLMForSequenceClassification.from_encoder(encoder, TASKS, tokenizer=tokenizer)
    assert model.config._attn_implementation == "eager"
    assert model.surgellm.encoder.config._attn_implementation == "eager"


def test_from_encoder_takes_how_to_load_the_encoder(tmp_path):
    """attn_implementation and dtype are how to load the encoder: the first
    raised "got multiple values", the second was kept in the config while
    the model stayed float32."""
    encoder_dir = tmp_path / "encoder"
    tokenizer = write_tokenizer(str(encoder_dir))
    tiny_bert(len(tokenizer)).save_pretrained(str(encoder_dir))
    tokenizer = transformers.AutoTokenizer.from_pretrained(encoder_dir)
    model = SurgeLLMForSequenceClassification.from_encoder(
        str(encoder_dir),
        {"a": 2},
        tokenizer=tokenizer,
        attn_implementation="eager",
        dtype=torch.bfloat16,
    )
    assert model.config._attn_implementation == "eager"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="a loaded encoder keeps its own"):
        SurgeLLMForSequenceClassification.from_encoder(
            tiny_bert(len(tokenizer)), {"a": 2}, tokenizer=tokenizer, dtype=torch.bfloat16
        )


def test_processor_saved_alone_loads(tokenizer_dir, tmp_path):
    """save_pretrained wrote the tokenizer only, and from_pretrained of that
    directory said "Unrecognized model"; it now writes the config where the
    model has not, and a directory without one is named as such."""
    model, processor = make_model(tokenizer_dir)
    processor.save_pretrained(tmp_path / "processor")
    loaded = SurgeLLMProcessor.from_pretrained(tmp_path / "processor")
    texts, tasks = ["a fine film", "maybe so"], ["sentiment", "authorship"]
    assert torch.equal(loaded(texts, tasks)["input_ids"], processor(texts, tasks)["input_ids"])
    processor.tokenizer.save_pretrained(tmp_path / "tokenizer")
    with pytest.raises(ValueError, match="holds no config.json"):
        SurgeLLMProcessor.from_pretrained(tmp_path / "tokenizer")


def test_int32_task_ids_and_array_inputs(tokenizer_dir):
    """int32 task ids passed the gate's check and then failed in the loss's
    one_hot (or IWN refused them); numpy / pandas inputs to the processor
    had no truth value."""
    import numpy as np

    model, processor = make_model(tokenizer_dir)
    texts, tasks = ["a fine film", "maybe so"], ["sentiment", "authorship"]
    batch = processor(np.array(texts), np.array(tasks), labels=np.array([1, 0]))
    assert torch.equal(batch["input_ids"], processor(texts, tasks)["input_ids"])
    model.train()
    torch.manual_seed(0)  # the same dropout masks for both calls
    expected = model(**batch).loss
    batch["task_ids"] = batch["task_ids"].int()
    torch.manual_seed(0)
    assert_close(model(**batch).loss, expected)
    base = model.surgellm(
        **{k: v for k, v in batch.items() if k != "labels"}, labels=batch["labels"]
    )
    assert base.pooler_output.shape[0] == 2


def test_trainer_takes_a_list_of_rows(tokenizer_dir, tmp_path):
    """Trainer takes any dataset of rows; SurgeLLMTrainer read a datasets
    column (dataset["task_ids"]) and failed on a list or torch Dataset."""
    from surgellm_kernels.surgellm.trainer import (
        FitIWNStatistics,
        SurgeLLMTrainer,
        SurgeLLMTrainingArguments,
    )

    model, processor = make_model(tokenizer_dir)
    texts, tasks, labels = synthetic_examples(8, 0)
    encoded = processor(texts, tasks, labels, padding=False, return_tensors=None)
    rows = [{k: v[i] for k, v in encoded.items()} for i in range(8)]
    args = SurgeLLMTrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        eval_strategy="no",
        load_best_model_at_end=False,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = SurgeLLMTrainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=transformers.DataCollatorWithPadding(processor.tokenizer),
        callbacks=[FitIWNStatistics(rows, 4)],
    )
    trainer.train()
    assert bool(model.surgellm.iwn.statistics_frozen)
    # an encoder config asking for hidden states: the predictions are the logits alone
    # (a tuple of logits and hidden states failed evaluate's and compute_metrics' argmax)
    model.config.output_hidden_states = True
    assert trainer.predict(rows).predictions.shape == (8, model.config.max_classes)
    order = list(trainer.task_sampler)  # batches of one task each, read from the rows
    for start in range(0, len(order), 4):
        assert len({rows[i]["task_ids"] for i in order[start : start + 4]}) == 1
    with pytest.raises(ValueError, match="must be mappings holding 'task_ids'"):
        trainer._get_train_sampler([{"text": "x"}])


def test_a_python_tokenizer_gets_the_prefix_rows_from_its_pieces(tokenizer_dir):
    """A tokenizer with no fast backend (a Python one): the pieces are read
    before the prefix tokens are added. It was refused, as if it already
    held them, after they had been added to it and the encoder grown."""
    try:  # transformers 5; in 4, BertTokenizer is the Python one
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy
    except ImportError:
        BertTokenizerLegacy = transformers.BertTokenizer
    tokenizer = BertTokenizerLegacy(vocab_file=os.path.join(tokenizer_dir, "vocab.txt"))
    assert not tokenizer.is_fast
    vocab = len(tokenizer)
    encoder = tiny_bert(vocab)
    before = encoder.get_input_embeddings().weight.detach().clone()
    pieces = tokenizer("|F3:", add_special_tokens=False)["input_ids"]
    model = SurgeLLMForSequenceClassification.from_encoder(encoder, TASKS, tokenizer=tokenizer)
    new = tokenizer.convert_tokens_to_ids("|F3:")
    assert new >= vocab and len(pieces) > 1
    assert_close(model.get_input_embeddings().weight[new], before[pieces].mean(0))
    # already grown and not fast: refused, and the fresh encoder left as it was
    encoder = tiny_bert(vocab)
    grown = len(tokenizer)
    with pytest.raises(ValueError, match="already holds the prefix tokens"):
        SurgeLLMForSequenceClassification.from_encoder(encoder, TASKS, tokenizer=tokenizer)
    assert len(tokenizer) == grown and encoder.get_input_embeddings().num_embeddings == vocab


def test_a_float16_model_saturates_counts_past_its_range(tokenizer_dir):
    """A text of more than 65504 words: the count was inf in float16 and the
    row's logits NaN."""
    model, processor = make_model(tokenizer_dir, tasks={"t": ["a", "b"]})
    batch = processor(["the film is good. " * 17000, "the film is good."], ["t", "t"])
    assert batch["features"].max() > torch.finfo(torch.float16).max
    with torch.no_grad():
        want = model(**batch).logits
        # a wider dtype than the features' float32 (the bound must fit theirs)
        wide = copy.deepcopy(model).double()(**batch).logits
        half = model.half()(**batch).logits
    assert_close(wide, want.double(), dtype=torch.float32)
    assert torch.isfinite(half).all()
    assert_close(half[1].float(), want[1], dtype=torch.float16)
