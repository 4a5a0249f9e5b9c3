"""Word lists from data (extract_vocabulary, the vocabulary command) and
features over any word lists (LexicalFeaturizer, a model trained with them)."""

import json
import math
import os

import numpy as np
import pytest
import torch

from surgellm_kernels import LexicalFeaturizer, lexical_features
from surgellm_kernels.surgellm.features import FEATURE_NAMES, WORD_GROUPS, task_prefix
from surgellm_kernels.surgellm.vocabulary import VocabularyEntry, extract_vocabulary, main

from _corpus import planted_corpus

HERE = os.path.dirname(os.path.abspath(__file__))


# -- extraction -------------------------------------------------------------------------
def test_planted_words_are_recovered_and_background_words_are_not():
    """Four words planted per class (in 10% to 30% of its documents) among
    Zipf background words shared by all classes: across 10 seeds, the top 4
    of each class are its planted words (at least 99% of them), and no
    background word or phrase is among them."""
    found = missed = intruders = 0
    for seed in range(10):
        texts, labels, planted = planted_corpus(3000, seed=seed)
        vocabulary = extract_vocabulary(texts, labels, top_k=4)
        assert sorted(vocabulary) == [0, 1, 2]
        for c, entries in vocabulary.items():
            got = {e.entry for e in entries}
            found += len(got & set(planted[c]))
            missed += len(set(planted[c]) - got)
            intruders += len(got - set(planted[c]))
    assert found / (found + missed) >= 0.99, (found, missed)
    assert intruders == 0


def _hand_z(own, n_own, other, n_other, alpha, alpha0):
    """The module docstring's z, from counts worked out by hand."""
    a, b = own + alpha, other + alpha
    delta = math.log(a / (n_own + alpha0 - a)) - math.log(b / (n_other + alpha0 - b))
    return delta / math.sqrt(1 / a + 1 / b)


def test_ranking_of_a_hand_worked_example():
    # A: good 2, nice 2, film 1, plot 1 (n_A = 6); B: bad 2, film 1, plot 1 (n_B = 4).
    # corpus: 2 of each of the 5 words, n = 10; prior 1: a_w = 2, a_0 = 10.
    texts = ["Good nice film.", "good, NICE plot", "bad film", "Bad plot!"]
    labels = ["A", "A", "B", "B"]
    got = extract_vocabulary(texts, labels, top_k=5, min_count=1, ngram_range=(1, 1))
    z_good = _hand_z(2, 6, 0, 4, 2, 10)  # log 2 / sqrt(3/4)
    z_bad = _hand_z(2, 4, 0, 6, 2, 10)  # log(0.4 * 7) / sqrt(3/4)
    z_film_b = _hand_z(1, 4, 1, 6, 2, 10)  # log(13/11) / sqrt(2/3)
    assert z_good == pytest.approx(0.800377, abs=1e-6)
    assert z_bad == pytest.approx(1.188902, abs=1e-6)
    assert z_film_b == pytest.approx(0.204598, abs=1e-6)
    # film and plot lean to B (z < 0 for A): A lists good and nice only, tied,
    # in the entries' order; B's film and plot tie too.
    assert [(e.entry, e.count, e.corpus_count) for e in got["A"]] == [
        ("good", 2, 2),
        ("nice", 2, 2),
    ]
    assert [(e.entry, e.count, e.corpus_count) for e in got["B"]] == [
        ("bad", 2, 2),
        ("film", 1, 2),
        ("plot", 1, 2),
    ]
    for entry, z in zip(got["A"], (z_good, z_good)):
        assert entry.z == pytest.approx(z, rel=1e-12)
    for entry, z in zip(got["B"], (z_bad, z_film_b, z_film_b)):
        assert entry.z == pytest.approx(z, rel=1e-12)
    # top_k cuts the ranked list; the result depends only on the input
    again = extract_vocabulary(
        list(reversed(texts)), list(reversed(labels)), top_k=1, min_count=1, ngram_range=(1, 1)
    )
    assert again == {"A": got["A"][:1], "B": got["B"][:1]}


def test_phrases_binary_counts_and_min_count():
    texts = ["great movie. great movie", "great, movie", "great \n movie", "dull film"] * 2
    labels = [1, 1, 0, 0] * 2
    counts = {
        e.entry: (e.count, e.corpus_count)
        for e in extract_vocabulary(texts, labels, top_k=10, min_count=1)[1]
    }
    # "great, movie" is no phrase (punctuation between); "great \n movie" is one
    assert counts["great movie"] == (4, 6)
    assert "movie great" not in counts  # across the full stop
    binary = {
        e.entry: (e.count, e.corpus_count)
        for e in extract_vocabulary(texts, labels, top_k=10, min_count=1, binary=True)[1]
    }
    assert binary["great movie"] == (2, 4)
    # min_count is on the corpus count: dull, film, "dull film" occur twice
    rare = {"dull", "film", "dull film"}
    kept = extract_vocabulary(texts, labels, top_k=10, min_count=2)[0]
    assert rare <= {e.entry for e in kept}
    kept = extract_vocabulary(texts, labels, top_k=10, min_count=3)[0]
    assert not rare & {e.entry for e in kept}


def test_a_class_without_kept_entries_gets_none():
    """Class C's texts hold no entry that reaches min_count: n_C = 0, every
    z is 0 up to rounding, and no entry (all of count 0 in C) is listed."""
    texts = ["good film", "good plot", "bad film", "bad plot", "zzz", ""]
    for prior in (0.3, 0.5, 1.0, 2.0):
        got = extract_vocabulary(
            texts, list("AABBCC"), min_count=2, ngram_range=(1, 1), prior=prior
        )
        assert got["C"] == [], prior
        assert [e.entry for e in got["A"]] == ["good"]


def test_a_word_as_frequent_in_the_class_as_in_the_rest_is_not_listed():
    """ "c" is a third of class 1's tokens and a third of the rest's: equal
    odds, z = 0 exactly, and only entries with z > 0 are listed. Rounding
    made it 4.6e-16 and listed it. Texts as a numpy array (no truth value)
    were refused."""
    texts = np.array(["a a c", "b a f b c", "c e f", "d a a c c", "a c"])
    got = extract_vocabulary(texts, [0, 0, 1, 0, 0], min_count=1, ngram_range=(1, 1))
    assert [e.entry for e in got[1]] == ["e", "f"]


def test_longer_phrases():
    texts = ["one two three four", "one two three", "two three four!", "x y"] * 3
    labels = [0, 0, 1, 1] * 3
    got = extract_vocabulary(texts, labels, top_k=10, min_count=1, ngram_range=(2, 3))
    entries = {e.entry: e.count for c in got for e in got[c]}
    assert all(2 <= len(e.split()) <= 3 for e in entries)
    # "one two three" twice per repetition, all in class 0
    assert entries["one two three"] == 6
    # trigrams: class 0 has "one two three" 6 times and "two three four" 3 times
    # (n_0 = 9), class 1 "two three four" 3 times (n_1 = 3): the latter leans
    # to class 1 (its share there is higher), "x y" is too short
    only = extract_vocabulary(texts, labels, top_k=10, min_count=1, ngram_range=(3, 3))
    assert [(e.entry, e.count) for e in only[0]] == [("one two three", 6)]
    assert [(e.entry, e.count) for e in only[1]] == [("two three four", 3)]


def test_extracted_entries_match_where_they_were_found():
    texts, labels, _ = planted_corpus(400, seed=3)
    texts = [t.replace(" w1 ", " Don't, ") for t in texts]  # apostrophes and punctuation
    vocabulary = extract_vocabulary(texts, labels, top_k=20, min_count=2, ngram_range=(1, 3))
    groups = {f"class{c}": [e.entry for e in entries] for c, entries in vocabulary.items()}
    featurizer = LexicalFeaturizer(groups, numeric=False)
    for c, entries in vocabulary.items():
        for e in entries:
            single = LexicalFeaturizer({"x": [e.entry]}, numeric=False)
            matched = sum(single.features_of(t)[0] for t, y in zip(texts, labels) if y == c)
            assert matched >= 1, e.entry
    assert featurizer(texts).shape == (400, 3)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            dict(labels=[0, 1]),
            ValueError,
            "texts and labels must have the same length, got 3 texts and 2 labels",
        ),
        (dict(labels=[1, 1, 1]), ValueError, r"labels hold one class only \(1\)"),
        (dict(texts=[], labels=[]), ValueError, "texts is empty"),
        (dict(texts=["", " ", "?!"]), ValueError, "texts hold no words"),
        (dict(top_k=0), ValueError, "top_k must be an int >= 1, got 0"),
        (dict(top_k=-3), ValueError, "top_k must be an int >= 1, got -3"),
        (dict(min_count=0), ValueError, "min_count must be an int >= 1, got 0"),
        (dict(ngram_range=(2, 1)), ValueError, "ngram_range must be"),
        (dict(prior=0.0), ValueError, r"prior must be a number in \[1e-06, 1e\+06\], got 0.0"),
        (dict(prior=1e300), ValueError, "prior must be a number in"),
        (dict(texts=["a b", None, "c"]), TypeError, r"texts\[1\] must be a string, got NoneType"),
        (dict(texts="a b c"), TypeError, "texts must be a sequence of strings"),
        (dict(labels=[0.5, 1.0, 0.5]), TypeError, r"labels\[0\] must be an int or a string"),
        (dict(labels=[0, "a", 0]), TypeError, "labels must all be ints or all be strings"),
        (dict(labels=[True, 1, 0]), TypeError, r"labels\[0\] must be an int or a string"),
        (dict(min_count=50), ValueError, "fewer than two entries occur at least min_count=50"),
    ],
)
def test_bad_input(call, error, message):
    kwargs = dict(texts=["good film", "bad film", "good plot"], labels=[0, 1, 0], min_count=1)
    kwargs.update(call)
    with pytest.raises(error, match=message):
        extract_vocabulary(**kwargs)


# -- the featurizer -----------------------------------------------------------------------
def test_default_featurizer_gives_exactly_the_features_of_before():
    """The paper's featurizer reproduces, bit for bit, lexical_features as it
    was before the word groups became data (200 texts: entries, case,
    punctuation, apostrophes, digits, empty texts)."""
    with open(os.path.join(HERE, "data", "lexical_features_ef32ed2.json")) as f:
        before = json.load(f)
    expected = torch.tensor(before["features"], dtype=torch.float32)
    assert torch.equal(LexicalFeaturizer()(before["texts"]), expected)
    assert torch.equal(lexical_features(before["texts"]), expected)
    assert LexicalFeaturizer().feature_names == FEATURE_NAMES
    assert LexicalFeaturizer().groups == WORD_GROUPS


def test_custom_groups_counted_by_hand():
    featurizer = LexicalFeaturizer(
        {"cinema": ["film", "movie*", "special effects"], "money": ["$", "budget"]}
    )
    assert featurizer.feature_names == ("cinema", "money") + FEATURE_NAMES[10:]
    texts = [
        "The FILM had special\teffects and a $5 budget!",  # cinema 2, money 2
        "Movies, movies: a filmmaker's budget?",  # cinema 1 (movie*), money 1
        "",
    ]
    got = featurizer(texts)
    expected = torch.tensor(
        [
            # the film had special effects and a 5 budget: 9 words, 35 characters
            [2, 2, 9, 35 / 9, 1, 0, 1, 1],
            # movies movies a filmmaker's budget: 5 words, 6 + 6 + 1 + 11 + 6 = 30
            [1, 1, 5, 30 / 5, 1, 1, 0, 0],
            [0] * 8,
        ]
    )
    assert torch.equal(got, expected)
    words_only = LexicalFeaturizer({"cinema": ["film"]}, numeric=False)
    assert words_only(texts).tolist() == [[1], [0], [0]]


def test_with_groups_replaces_and_extends_and_json_round_trips():
    base = LexicalFeaturizer()
    extended = base.with_groups({"sst_pos": ["good"], "news:sports": ["match", "goal"]})
    assert extended.feature_names[:10] == FEATURE_NAMES[:10]  # replaced in place
    assert extended.feature_names[10] == "news:sports"
    assert extended.num_features == 17 and extended.groups["sst_pos"] == ("good",)
    assert base.groups["sst_pos"] == WORD_GROUPS["sst_pos"]  # unchanged
    restored = LexicalFeaturizer.from_json(extended.to_json())
    assert restored == extended and restored.feature_names == extended.feature_names
    # the groups' order is the columns' order: part of equality
    swapped = LexicalFeaturizer({"y": ["good"], "x": ["film"]})
    assert swapped != LexicalFeaturizer({"x": ["film"], "y": ["good"]})
    texts = ["A good match, a late goal.", "Nothing here"]
    assert torch.equal(restored(texts), extended(texts))
    assert restored(texts)[0, 10] == 2


@pytest.mark.parametrize(
    "groups, numeric, message",
    [
        ({"a": []}, True, r"groups\['a'\] must be a non-empty list of entries"),
        ({"a": "word"}, True, r"groups\['a'\] must be a non-empty list"),
        ({"a": ["ok", ""]}, True, r"groups\['a'\]: entries must be non-empty strings, got ''"),
        # invisible characters alone: nothing to match once they are dropped
        ({"a": ["\u00ad"]}, True, r"entries must be non-empty strings, got '\\xad'"),
        ({"a": ["\u200b*"]}, True, r"entries must be non-empty strings, got '\\u200b\*'"),
        ({"": ["x"]}, True, "group names must be non-empty strings"),
        ({"word_count": ["x"]}, True, "is the name of a numeric feature"),
        ({}, False, "at least one group or numeric=True"),
        ({"a": ["Good", "good"]}, True, r"groups\['a'\] lists 'good' twice"),
        ({"a": ["special effects", "special  Effects"]}, True, "lists 'special effects' twice"),
    ],
)
def test_featurizer_bad_groups(groups, numeric, message):
    with pytest.raises(ValueError, match=message):
        LexicalFeaturizer(groups, numeric=numeric)
    with pytest.raises(ValueError, match="an object with 'groups'"):
        LexicalFeaturizer.from_json('{"numeric": true}')


@pytest.mark.parametrize(
    "text, message",
    [  # each read as something else before: the paper's groups, 7 features, one group
        ('{"groups": null, "numeric": false}', "'groups' must be an object"),
        ('{"groups": {"a": ["x"]}, "numerc": false}', r"unknown keys \['numerc'\]"),
        ('{"groups": {"a": ["x"], "a": ["y"]}}', "gives 'a' twice in one object"),
    ],
)
def test_featurizer_json_read_strictly(text, message):
    with pytest.raises(ValueError, match=message):
        LexicalFeaturizer.from_json(text)


def test_with_groups_takes_a_mapping():
    for bad in ("abc", None, [1, 2]):
        with pytest.raises(TypeError, match="groups must map a group name to its entries"):
            LexicalFeaturizer().with_groups(bad)


def test_task_prefix_of_another_width():
    assert task_prefix("t", [1.5, 2.0], num_features=2) == "[TASK:t|F1:1|F2:2]"
    assert task_prefix("t", np.array([1.5, 2.0]), num_features=2) == "[TASK:t|F1:1|F2:2]"
    for bad, message in (
        ([1.5, 2.0], "one row of 16 numbers, got"),
        (3.0, "one row of 16 numbers, got"),
        (torch.zeros(16, 1), "one row of 16 numbers, got"),
        ([float("nan")] * 16, "must be finite"),
    ):
        with pytest.raises(ValueError, match=message):
            task_prefix("t", bad)


# -- the command ----------------------------------------------------------------------------
def _write_corpus(path, n=600):
    texts, labels, planted = planted_corpus(n, num_classes=2, seed=5)
    names = ["neg", "pos"]
    with open(path, "w") as f:
        for i, (t, y) in enumerate(zip(texts, labels)):
            task = "reviews" if i % 2 else "forum"
            f.write(json.dumps({"text": t, "label": names[y], "task": task}) + "\n")
    return planted


def test_vocabulary_command(tmp_path, capsys):
    data, out = tmp_path / "train.jsonl", tmp_path / "vocab.json"
    planted = _write_corpus(data)
    assert main(["--data", str(data), "--top-k", "4", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: 20 features (4 extracted groups)" in printed
    with open(out) as f:
        document = json.load(f)
    assert document["format"] == "surgellm-lexicon"
    assert document["extraction"]["top_k"] == 4
    featurizer = LexicalFeaturizer.from_json(out.read_text())
    assert featurizer.feature_names[:10] == FEATURE_NAMES[:10]
    assert featurizer.feature_names[10:14] == (
        "forum:neg",
        "forum:pos",
        "reviews:neg",
        "reviews:pos",
    )
    for task in ("forum", "reviews"):
        for c, label in enumerate(["neg", "pos"]):
            entries = document["vocabularies"][task][label]
            assert [e["entry"] for e in entries] == list(featurizer.groups[f"{task}:{label}"])
            assert set(featurizer.groups[f"{task}:{label}"]) == set(planted[c])
            assert all(set(e) == set(VocabularyEntry._fields) for e in entries)
    only = tmp_path / "only.json"
    assert (
        main(["--data", str(data), "--top-k", "4", "--output", str(only), "--only-extracted"]) == 0
    )
    assert LexicalFeaturizer.from_json(only.read_text()).num_features == 4 + 6


def test_vocabulary_command_orders_int_classes_as_training_does(tmp_path, capsys):
    """Labels 9 and 10 are classes 9, 10 in training (ints in numeric
    order); the command ordered them as strings ("10" before "9")."""
    texts, labels, _ = planted_corpus(200, num_classes=2, seed=5)
    data, out = tmp_path / "train.jsonl", tmp_path / "vocab.json"
    with open(data, "w") as f:
        for t, y in zip(texts, labels):
            f.write(json.dumps({"text": t, "label": 9 + int(y), "task": "t"}) + "\n")
    assert main(["--data", str(data), "--top-k", "2", "--output", str(out)]) == 0
    document = json.loads(out.read_text())
    assert list(document["vocabularies"]["t"]) == ["9", "10"]
    names = LexicalFeaturizer.from_json(out.read_text()).feature_names
    assert [n for n in names if n.startswith("t:")] == ["t:9", "t:10"]


def test_vocabulary_command_refuses_groups_of_one_name(tmp_path, capsys):
    # task "a" class "b:c" and task "a:b" class "c" are both the group "a:b:c"
    rows = [("apple pie", "a", "b:c"), ("pear tart", "a", "d")] * 6
    rows += [("red car", "a:b", "c"), ("blue bus", "a:b", "e")] * 6
    data = tmp_path / "collide.jsonl"
    data.write_text("".join(json.dumps(dict(text=t, task=k, label=c)) + "\n" for t, k, c in rows))
    args = ["--data", str(data), "--output", str(tmp_path / "v.json"), "--min-count", "1"]
    assert main(args) == 2
    assert "would both be the group 'a:b:c'" in capsys.readouterr().err
    assert not (tmp_path / "v.json").exists()


def test_vocabulary_command_errors(tmp_path, capsys):
    data = tmp_path / "one_class.jsonl"
    data.write_text(json.dumps({"text": "a b", "label": "x", "task": "t"}) + "\n")
    assert main(["--data", str(data), "--output", str(tmp_path / "v.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {data}:1: task 't' has a single class ('x')"), err
    mixed = tmp_path / "mixed.jsonl"  # 1 and "1": the training command's error too
    mixed.write_text(
        "".join(json.dumps({"text": "a", "label": v, "task": "t"}) + "\n" for v in (1, "1", 2))
    )
    assert main(["--data", str(mixed), "--output", str(tmp_path / "v.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {mixed}:2: task 't' mixes int and string labels"), err
    assert (
        main(["--data", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "v.json")]) == 2
    )
    assert not (tmp_path / "v.json").exists()
    capsys.readouterr()
    # a bad option is named as one, before the data is read
    for option, value in (("--top-k", "0"), ("--min-count", "0"), ("--max-words", "0")):
        args = ["--data", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "v.json")]
        assert main([*args, option, value]) == 2
        err = capsys.readouterr().err
        assert f"error: argument {option}: invalid value 0" in err and "missing" not in err
    assert main(["--data", str(data), "--output", str(tmp_path / "v.json"), "--prior", "-1"]) == 2
    err = capsys.readouterr().err
    assert "argument --prior: invalid value -1.0" in err and "task" not in err
    good = tmp_path / "good.jsonl"
    _write_corpus(good, n=60)
    assert (
        main(
            [
                "--data",
                str(good),
                "--min-count",
                "1",
                "--output",
                str(tmp_path / "no-such-dir" / "v.json"),
            ]
        )
        == 2
    )
    assert "error:" in capsys.readouterr().err
