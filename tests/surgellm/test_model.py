"""SurgeLLMModel on a tiny local BERT: the reference model and a patched copy
train alike; save / load; torch.compile; autocast; the ablations; input errors."""
import copy
import os

import pytest
import torch
from safetensors.torch import load_model

from _helpers import assert_close
from _tiny_encoder import TASKS, synthetic_examples, tiny_bert, write_tokenizer
from surgellm_kernels import (FusedInstanceWeightedNorm, FusedSurgicalGate, LexicalFeaturizer,
                              SurgeLLMConfig, SurgeLLMModel, backends, patch_model)
from surgellm_kernels.surgellm.model import UngatedFusion

transformers = pytest.importorskip("transformers")
BATCH = 16


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tokenizer"))
    write_tokenizer(directory)
    return directory


def make_model(tokenizer_dir, seed=0, **options):
    # a fresh tokenizer each time: from_encoder adds the prefix tokens to it
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    encoder = tiny_bert(len(tokenizer), seed)
    torch.manual_seed(seed + 1)
    return SurgeLLMModel.from_encoder(encoder, TASKS, tokenizer=tokenizer, **options)


def make_batches(model, steps, seed=0, size=BATCH):
    texts, tasks, labels = synthetic_examples(steps * size, seed)
    return [model.prepare(texts[i:i + size], tasks[i:i + size], labels[i:i + size])
            for i in range(0, steps * size, size)]


def finite_logits_close(actual, expected, dtype=torch.float32, scale=1.0):
    assert torch.equal(torch.isinf(actual), torch.isinf(expected))
    finite = torch.isfinite(expected)
    assert_close(actual[finite], expected[finite], dtype, scale)


def assert_fast_path(report):
    """A swapped module running the eager reference where the CPU kernel
    exists means the fused path was not taken: fail."""
    if backends("cpu")["cpu"].available:
        assert not report.eager, f"fused modules run the eager reference:\n{report}"


# -- convergence ------------------------------------------------------------------------
@pytest.mark.parametrize("statistics", ["fitted", "batch"])
def test_patched_model_trains_like_reference(tokenizer_dir, statistics):
    """30 AdamW steps side by side, float32, dropout on (the same masks for
    both): step-0 gradients, every loss, every parameter and buffer after.

    With batch statistics the batch is 64 rows: at 16, some task has one row
    per class, so its sigma is 0 and IWN divides by eps alone -- a 1e5 gain
    on the last-bit difference of the class means, in any two
    implementations (the paper fits fixed statistics for this reason)."""
    reference = make_model(tokenizer_dir)
    batches = make_batches(reference, 30, size=BATCH if statistics == "fitted" else 64)
    if statistics == "fitted":
        reference.fit_statistics(batches)
    patched = copy.deepcopy(reference)
    report = patch_model(patched)
    assert sorted(report.backends) == ["fusion", "iwn"]
    assert isinstance(patched.iwn, FusedInstanceWeightedNorm)
    assert isinstance(patched.fusion, FusedSurgicalGate)
    assert_fast_path(report)

    models = (reference, patched)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in models]
    first_grads = []
    for step, batch in enumerate(batches):
        losses = []
        for model, optimizer in zip(models, optimizers):
            model.train()
            torch.manual_seed(step)
            optimizer.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            if step == 0:
                first_grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                                    if p.grad is not None})
            optimizer.step()
            losses.append(loss.detach())
        assert_close(losses[1], losses[0])
    assert first_grads[0].keys() == first_grads[1].keys()
    assert "fusion.gate.weight" in first_grads[0] and "encoder.embeddings.word_embeddings.weight" in first_grads[0]
    for name, grad in first_grads[0].items():
        assert_close(first_grads[1][name], grad, name=name)
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
    if statistics == "batch":  # running statistics moved away from their initial values
        assert not torch.equal(reference.iwn.running_mean, torch.zeros_like(reference.iwn.running_mean))


# -- saving -----------------------------------------------------------------------------
def test_save_pretrained_round_trip(tokenizer_dir, tmp_path):
    model = make_model(tokenizer_dir)
    batch = make_batches(model, 1)[0]
    model.fit_statistics([batch]).eval()
    expected = model(**batch).logits
    model.save_pretrained(tmp_path / "reference")
    files = sorted(os.listdir(tmp_path / "reference"))
    assert "surgellm_config.json" in files and "model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl"))], files

    loaded = SurgeLLMModel.from_pretrained(tmp_path / "reference").eval()
    assert loaded.config == model.config
    assert loaded.iwn._frozen and loaded.config.class_names == TASKS
    assert torch.equal(loaded(**batch).logits, expected)
    # the loaded tokenizer knows the prefix tokens: the same input ids
    again = loaded.prepare(["great film !"], ["sentiment"])
    assert torch.equal(again["input_ids"], model.prepare(["great film !"], ["sentiment"])["input_ids"])

    # a fused model loads the reference model's weights ...
    fused = make_model(tokenizer_dir, seed=5)
    assert_fast_path(patch_model(fused))
    load_model(fused, tmp_path / "reference" / "model.safetensors")
    fused.eval()
    finite_logits_close(fused(**batch).logits, expected)
    assert_fast_path(patch_model(loaded))
    # ... and the reference model the fused model's
    loaded.save_pretrained(tmp_path / "fused")
    back = SurgeLLMModel.from_pretrained(tmp_path / "fused").eval()
    assert type(back.fusion).__name__ == "SurgicalGate"
    assert torch.equal(back(**batch).logits, expected)


def test_model_with_its_own_word_lists(tokenizer_dir, tmp_path):
    """A lexicon with two more groups: 18 features (IWN, gate, prefix fields),
    saved with the model and restored by from_pretrained."""
    lexicon = LexicalFeaturizer().with_groups({"films": ["film", "movie"],
                                               "praise": ["great", "fine"]})
    model = make_model(tokenizer_dir, lexicon=lexicon)
    assert model.featurizer == lexicon and model.config.lexicon == lexicon.to_dict()
    assert model.iwn.num_features == 18
    assert model.fusion.feature_projection.in_features == 18
    batch = model.prepare(["great film, fine movie !"], ["sentiment"])
    assert batch["features"][0, 10:12].tolist() == [2, 2]
    tokens = model.tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    assert [tokens[2 + 2 * j] for j in range(18)] == [f"|F{j}:" for j in range(1, 19)]
    batches = make_batches(model, 1)
    model.fit_statistics(batches).eval()
    expected = model(**batches[0]).logits
    model.save_pretrained(tmp_path / "lexicon")
    loaded = SurgeLLMModel.from_pretrained(tmp_path / "lexicon").eval()
    assert loaded.featurizer == lexicon and loaded.config == model.config
    assert loaded.featurizer.feature_names == lexicon.feature_names
    assert torch.equal(loaded(**batches[0]).logits, expected)
    with pytest.raises(ValueError, match=r"groups\['x'\] must be a non-empty list"):
        make_model(tokenizer_dir, lexicon={"groups": {"x": []}})
    # the paper's lists leave the key out: configs of earlier versions read alike
    plain = make_model(tokenizer_dir).config
    assert "lexicon" not in plain.to_dict()
    assert SurgeLLMConfig.from_dict(plain.to_dict()) == plain
    assert SurgeLLMConfig.from_dict(plain.to_dict()).featurizer() == LexicalFeaturizer()


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="surgellm_config.json"):
        SurgeLLMModel.from_pretrained(tmp_path)


def test_from_encoder_loads_a_local_path(tokenizer_dir, tmp_path):
    encoder_dir = tmp_path / "encoder"
    tokenizer = write_tokenizer(str(encoder_dir))
    tiny_bert(len(tokenizer)).save_pretrained(str(encoder_dir))
    model = SurgeLLMModel.from_encoder(str(encoder_dir), {"a": 2, "b": 3})
    assert model.config.encoder_name == str(encoder_dir)
    assert model.config.tasks == {"a": 2, "b": 3} and model.config.class_names is None
    out = model(**model.prepare(["great film", "maybe"], ["a", "b"], labels=[1, 2]))
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)


# -- torch.compile, autocast ------------------------------------------------------------
def test_patched_compiled_model_matches_eager(tokenizer_dir):
    model = make_model(tokenizer_dir)
    batches = make_batches(model, 2)
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
    model = make_model(tokenizer_dir)
    batch = make_batches(model, 1)[0]
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
    model = make_model(tokenizer_dir)
    batch = make_batches(model, 1)[0]
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


# -- ablations --------------------------------------------------------------------------
@pytest.mark.parametrize("component", ["iwn", "gate", "prefix"])
def test_ablations(tokenizer_dir, component):
    model = make_model(tokenizer_dir, **{component: False})
    batch = make_batches(model, 1)[0]
    if component == "iwn":
        assert model.iwn is None and not any(k.startswith("iwn.") for k in model.state_dict())
        with pytest.raises(RuntimeError, match="iwn=False"):
            model.fit_statistics([batch])
    else:
        model.fit_statistics([batch])
    if component == "gate":
        assert isinstance(model.fusion, UngatedFusion)
    if component == "prefix":
        base = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
        assert len(model.tokenizer) == len(base)
        plain = base(synthetic_examples(1)[0][0], return_tensors="pt")["input_ids"][0]
        assert torch.equal(batch["input_ids"][0, :len(plain)], plain)
    else:
        first = model.tokenizer.convert_ids_to_tokens(batch["input_ids"][0][:3].tolist())
        assert first[1].startswith("[TASK:") and first[2] == "|F1:"
    report = patch_model(model)
    expected = {"iwn": ["fusion"], "gate": ["iwn"], "prefix": ["fusion", "iwn"]}[component]
    assert sorted(report.backends) == expected
    model.train()
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)


# -- inputs -----------------------------------------------------------------------------
def test_prefix_tokens_and_features(tokenizer_dir):
    model = make_model(tokenizer_dir)
    text = "I think this film was great! 3 times?"
    batch = model.prepare([text], ["sentiment"])
    tokens = model.tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    # [CLS] [TASK:sentiment |F1: 1 ... |F16: 1 ] text... [SEP]
    assert tokens[1] == "[TASK:sentiment"
    assert [tokens[2 + 2 * j] for j in range(16)] == [f"|F{j}:" for j in range(1, 17)]
    assert tokens[2 + 2 * 15 + 1] == "1" and tokens[34] == "]" and tokens[35] == "i"
    assert batch["features"].shape == (1, 16) and batch["task_ids"].tolist() == [0]


def test_truncation_keeps_the_prefix(tokenizer_dir):
    model = make_model(tokenizer_dir, max_length=40)
    batch = model.prepare(["great " * 100], ["sentiment"])
    assert batch["input_ids"].shape[1] == 40
    # features come from the full text, before truncation
    assert batch["features"][0, 10] == 100
    with pytest.raises(ValueError, match="max_length=30 cannot hold the task prefix"):
        make_model(tokenizer_dir, max_length=30).prepare(["great"], ["sentiment"])


def test_input_errors(tokenizer_dir):
    model = make_model(tokenizer_dir)
    with pytest.raises(ValueError, match=r"tasks\[1\]: unknown task 'nope'"):
        model.prepare(["a", "b"], ["sentiment", "nope"])
    with pytest.raises(ValueError, match=r"labels\[1\]=2 is not a class of task 'authorship'"):
        model.prepare(["a", "b"], ["sentiment", "authorship"], labels=[0, 2])
    with pytest.raises(ValueError, match="texts and tasks must be sequences of one length"):
        model.prepare(["a", "b"], ["sentiment"])
    batch = model.prepare(["a", "b"], ["sentiment", "authorship"], labels=[0, 1])
    batch["labels"] = torch.tensor([0, 5])
    with pytest.raises(ValueError, match=r"labels\[1\]=5"):
        model(**batch)
    with pytest.raises(ValueError, match="number of classes >= 2"):
        SurgeLLMModel.from_encoder(model.encoder, {"x": 1}, tokenizer=model.tokenizer)
    with pytest.raises(ValueError, match="task names"):
        SurgeLLMModel.from_encoder(model.encoder, {"a b": 2}, tokenizer=model.tokenizer)
    with pytest.raises(ValueError, match="tokenizer is required"):
        SurgeLLMModel.from_encoder(model.encoder, {"a": 2})
    with pytest.raises(ValueError, match="max_position_embeddings"):
        SurgeLLMModel.from_encoder(model.encoder, {"a": 2}, tokenizer=model.tokenizer,
                                   max_length=1000)


def test_predict_names_classes(tokenizer_dir):
    model = make_model(tokenizer_dir)
    model.train()
    predictions = model.predict(["great film", "maybe i think"], ["sentiment", "authorship"])
    assert predictions[0] in TASKS["sentiment"] and predictions[1] in TASKS["authorship"]
    assert model.training  # restored


def test_task_names_that_are_not_attribute_names(tokenizer_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    model = SurgeLLMModel.from_encoder(tiny_bert(len(tokenizer)), {"sst.2": 2, "type": 3},
                                       tokenizer=tokenizer)
    out = model(**model.prepare(["great", "maybe"], ["sst.2", "type"], labels=[1, 2]))
    assert torch.isfinite(out.loss) and [len(h[-1].bias) for h in model.heads] == [2, 3]


def test_reused_tokenizer_still_resizes_a_fresh_encoder(tokenizer_dir, tmp_path):
    model = make_model(tokenizer_dir)
    # the tokenizer already holds the prefix tokens: a new encoder must grow too
    again = SurgeLLMModel.from_encoder(tiny_bert(len(transformers.AutoTokenizer.from_pretrained(
        tokenizer_dir))), TASKS, tokenizer=model.tokenizer)
    embeddings = again.encoder.get_input_embeddings().num_embeddings
    assert embeddings == len(model.tokenizer)
    again.eval()(**again.prepare(["great film"], ["sentiment"]))
    # no pooler (unused: no parameter without a gradient); a model with no
    # tokenizer saves and loads too
    assert again.encoder.pooler is None
    bare = SurgeLLMModel(again.config, again.encoder)
    bare.save_pretrained(tmp_path / "bare")
    loaded = SurgeLLMModel.from_pretrained(tmp_path / "bare")
    assert loaded.tokenizer is None and loaded.encoder.pooler is None


def test_constant_feature_is_scaled_by_one(tokenizer_dir):
    model = make_model(tokenizer_dir)
    batch = model.prepare(["great film .", "dull film ."], ["sentiment", "sentiment"],
                          labels=[1, 0])
    with pytest.warns(RuntimeWarning, match="no spread"):
        model.fit_statistics([batch])
    sigma = model.iwn.running_std[0]
    assert (sigma > 0).all()
    model.eval()
    odd = model.prepare(["what ? ! 7"], ["sentiment"])
    assert model.iwn(odd["features"], task_ids=odd["task_ids"]).abs().max() < 100
