"""Word lists from labelled text: the weighted log-odds ratio with an
informative Dirichlet prior (Monroe, Colaresi & Quinn 2008, "Fightin' Words").

For class c against the rest of the corpus (the other classes together), with
``y_cw`` the count of entry w in class c's texts, ``n_c`` the sum of class
c's counts over every entry kept (all lengths together, after
``min_count``), ``y_rw`` / ``n_r`` the same for the rest, and a prior that
gives entry w ``a_w = prior * y_w`` pseudo-counts in proportion to its count
in the whole corpus (``a_0 = sum_w a_w``)::

    delta_w = log((y_cw + a_w) / (n_c + a_0 - y_cw - a_w))
            - log((y_rw + a_w) / (n_r + a_0 - y_rw - a_w))
    var_w   = 1 / (y_cw + a_w) + 1 / (y_rw + a_w)
    z_w     = delta_w / sqrt(var_w)

An entry is a run of 1 to ``ngram_range[1]`` adjacent words (white space
only between them), lower-cased and tokenized as
:mod:`surgellm_kernels.surgellm.features` does, so an extracted entry matches, as a
:class:`LexicalFeaturizer` entry, the texts it was found in. Counting is
vectorized (numpy): one regular-expression pass per text, no Python loop over
tokens or entries.

Command line (the training command's JSON-lines format: ``text``, ``label``,
``task``; one vocabulary per (task, class))::

    python -m surgellm_kernels.vocabulary --data train.jsonl --top-k 10 --output vocab.json

The output is a :class:`LexicalFeaturizer` file (``groups``: the paper's
groups, then one group ``<task>:<class>`` per class, unless
``--only-extracted``) with the ranked entries, z-scores and counts under
``vocabularies``; ``LexicalFeaturizer.from_json`` reads it.
"""

from __future__ import annotations

import json
import numbers
import os
import sys
from argparse import ArgumentParser
from typing import Dict, Hashable, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from .features import LexicalFeaturizer, is_word, tokens

__all__ = ["VocabularyEntry", "extract_vocabulary", "LexicalFeaturizer", "main"]

FORMAT = "surgellm-lexicon"
MIN_PRIOR, MAX_PRIOR = 1e-6, 1e6


class VocabularyEntry(NamedTuple):
    """One extracted entry: its z-score for the class, its count in the
    class's texts and in the whole corpus."""

    entry: str
    z: float
    count: int
    corpus_count: int


def _check_arguments(texts, labels, top_k, min_count, ngram_range, prior, binary):
    if isinstance(texts, (str, bytes)) or not hasattr(texts, "__len__"):
        raise TypeError(f"texts must be a sequence of strings, got {type(texts).__name__}")
    if isinstance(labels, (str, bytes)) or not hasattr(labels, "__len__"):
        raise TypeError(f"labels must be a sequence of class labels, got {type(labels).__name__}")
    if len(texts) != len(labels):
        raise ValueError(
            f"texts and labels must have the same length, got {len(texts)} texts "
            f"and {len(labels)} labels"
        )
    if len(texts) == 0:  # (a numpy array or pandas Series has no truth value)
        raise ValueError("texts is empty: nothing to extract from")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a string, got {type(t).__name__}")
    _check_options(top_k, min_count, ngram_range, prior, binary)


class OptionError(ValueError):
    """A bad extraction option; ``name`` is its parameter's (the command names
    its flag from it)."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name} {message}")
        self.name = name


def _check_options(top_k, min_count, ngram_range, prior, binary):
    for name, value, low in (("top_k", top_k, 1), ("min_count", min_count, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise OptionError(name, f"must be an int >= {low}, got {value!r}")
    if (
        not isinstance(ngram_range, (tuple, list))
        or len(ngram_range) != 2
        or not all(isinstance(n, int) and not isinstance(n, bool) for n in ngram_range)
        or not 1 <= ngram_range[0] <= ngram_range[1]
    ):
        raise OptionError(
            "ngram_range", f"must be (min_n, max_n) with 1 <= min_n <= max_n, got {ngram_range!r}"
        )
    # Far outside this range the z-scores lose all precision (1/a_w overflows,
    # or the prior drowns every count).
    if (
        isinstance(prior, bool)
        or not isinstance(prior, numbers.Real)
        or not (MIN_PRIOR <= prior <= MAX_PRIOR)
    ):
        raise OptionError(
            "prior", f"must be a number in [{MIN_PRIOR:g}, {MAX_PRIOR:g}], got {prior!r}"
        )
    if not isinstance(binary, bool):
        raise TypeError(f"binary must be a bool, got {binary!r}")


def _classes(labels) -> Tuple[list, np.ndarray]:
    """The distinct labels, sorted, and each row's index among them."""
    values = labels.tolist() if hasattr(labels, "tolist") else list(labels)
    for i, v in enumerate(values):
        if not isinstance(v, Hashable) or isinstance(v, (float, bool)):
            raise TypeError(f"labels[{i}] must be an int or a string, got {v!r}")
    try:
        classes = sorted(set(values))
    except TypeError:
        raise TypeError("labels must all be ints or all be strings") from None
    if len(classes) < 2:
        raise ValueError(
            f"labels hold one class only ({classes[0]!r}): the log-odds ratio "
            f"compares a class with the others, so at least two are needed"
        )
    index = {c: i for i, c in enumerate(classes)}
    return classes, np.fromiter(map(index.__getitem__, values), np.int64, len(values))


def _token_stream(texts, progress: bool):
    """All texts' tokens as ids into ``vocab``, each text followed by a
    separator (an empty token), and each token's text index."""
    stream: List[str] = []
    lengths = np.empty(len(texts), np.int64)
    iterator = enumerate(texts)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=len(texts), desc="tokenizing", unit=" texts", disable=None)
    for i, text in iterator:
        found = tokens(text)
        stream += found
        stream.append("")
        lengths[i] = len(found) + 1
    vocab = list(dict.fromkeys(stream))
    index = {t: i for i, t in enumerate(vocab)}
    ids = np.fromiter(map(index.__getitem__, stream), np.int64, len(stream))
    word = np.fromiter(map(is_word, vocab), bool, len(vocab))
    doc = np.repeat(np.arange(len(texts), dtype=np.int64), lengths)
    return vocab, ids, word[ids], doc


def _ngrams(ids, word, max_n):
    """For n = 1..max_n: (start positions of the n-grams made of n adjacent
    words, their n-gram ids, first-occurrence positions of each id)."""
    V = int(ids.max()) + 1
    not_word = np.concatenate([[0], np.cumsum(~word)])  # non-words before each position
    out = []
    codes = ids  # the (n-1)-gram id at each position
    for n in range(1, max_n + 1):
        if n > 1:  # extend each (n-1)-gram at i by the token at i + n - 1
            codes = codes[: len(ids) - n + 1] * V + ids[n - 1 :]
        starts = np.nonzero(not_word[n:] - not_word[:-n] == 0)[0]  # n words in a row
        _, first, gram = np.unique(codes[starts], return_index=True, return_inverse=True)
        gram = gram.reshape(-1)
        out.append((starts, gram, starts[first]))
        codes = np.zeros(len(codes), np.int64)  # keep codes small: the n-gram ids
        codes[starts] = gram
    return out


def extract_vocabulary(
    texts: Sequence[str],
    labels: Sequence,
    top_k: int = 10,
    min_count: int = 5,
    ngram_range: Tuple[int, int] = (1, 2),
    prior: float = 1.0,
    binary: bool = False,
    progress: bool = False,
) -> Dict[object, List[VocabularyEntry]]:
    """The ``top_k`` entries most associated with each class of ``labels``.

    Args:
        texts: the documents.
        labels: each document's class (ints or strings); at least two classes.
        top_k: entries per class at most.
        min_count: entries counted fewer times in the whole corpus are left out.
        ngram_range: (min_n, max_n): entries are runs of min_n to max_n words.
        prior: the Dirichlet prior's weight: ``a_w = prior * y_w`` (1.0 gives
            the prior as many pseudo-counts as the corpus has counts).
        binary: count an entry once per document (document frequency) instead
            of once per occurrence.
        progress: a progress bar over the texts (``tqdm``, on a terminal only).

    Returns ``{class: [VocabularyEntry(entry, z, count, corpus_count), ...]}``
    for every class in sorted order, each list ranked by z-score (highest
    first; ties by the entry) and holding only entries with z > 0. The result
    depends only on the input.
    """
    _check_arguments(texts, labels, top_k, min_count, ngram_range, prior, binary)
    texts, top_k, min_count = list(texts), int(top_k), int(min_count)
    classes, row_class = _classes(labels)
    C = len(classes)
    vocab, ids, word, doc = _token_stream(texts, progress)
    if not word.any():
        raise ValueError("texts hold no words (all empty or punctuation only)")
    grams = _ngrams(ids, word, ngram_range[1])[ngram_range[0] - 1 :]
    # One id space over all n: (n, gram) -> offset + gram.
    entry_of, row_of, first_at, lengths, offset = [], [], [], [], 0
    for n, (starts, gram, first) in enumerate(grams, start=ngram_range[0]):
        entry_of.append(gram + offset)
        row_of.append(doc[starts])
        first_at.append(first)
        lengths.append(np.full(len(first), n))
        offset += len(first)
    entry, row = np.concatenate(entry_of), np.concatenate(row_of)
    first_at, lengths = np.concatenate(first_at), np.concatenate(lengths)
    E = offset
    if binary:  # each (document, entry) once
        pair = np.unique(row * E + entry)
        row, entry = pair // E, pair % E
    corpus = np.bincount(entry, minlength=E)
    kept = np.nonzero(corpus >= min_count)[0]
    if len(kept) < 2:
        raise ValueError(
            f"fewer than two entries occur at least min_count={min_count} times: "
            f"lower min_count or give more text"
        )
    remap = np.full(E, -1, np.int64)
    remap[kept] = np.arange(len(kept))
    keep_rows = remap[entry] >= 0
    K = len(kept)
    counts = (
        np.bincount(row_class[row[keep_rows]] * K + remap[entry[keep_rows]], minlength=C * K)
        .reshape(C, K)
        .astype(np.float64)
    )
    z = _log_odds_z(counts, prior)
    total = corpus[kept]

    def text_of(k: int) -> str:
        start, n = first_at[kept[k]], lengths[kept[k]]
        return " ".join(vocab[t] for t in ids[start : start + n])

    result = {}
    for c, label in enumerate(classes):
        zc = z[c]
        # (an entry absent from the class has z <= 0 in exact arithmetic)
        positive = np.nonzero((zc > 0) & (counts[c] > 0))[0]
        if len(positive) > top_k:  # every entry tied with the k-th, then sort exactly
            kth = np.partition(zc[positive], len(positive) - top_k)[len(positive) - top_k]
            positive = positive[zc[positive] >= kth]
        ranked = sorted(((-float(zc[k]), text_of(k), k) for k in positive))[:top_k]
        result[label] = [
            VocabularyEntry(text, -neg_z, int(counts[c, k]), int(total[k]))
            for neg_z, text, k in ranked
        ]
    return result


def _log_odds_z(counts: np.ndarray, prior: float) -> np.ndarray:
    """z-scores (C, K) of each class's log-odds against the rest, from the
    (C, K) counts (module docstring)."""
    corpus = counts.sum(0)
    alpha = prior * corpus
    alpha0 = alpha.sum()
    n = counts.sum(1, keepdims=True)
    rest, n_rest = corpus - counts, n.sum() - n
    own = counts + alpha
    other = rest + alpha
    logs = (np.log(own), np.log(n + alpha0 - own), np.log(other), np.log(n_rest + alpha0 - other))
    delta = (logs[0] - logs[1]) - (logs[2] - logs[3])
    # Equal odds (a word as frequent in the class as in the rest) give a delta
    # of a few rounding errors of either sign: within a bound of those
    # errors (each log's argument a few ulps off, each log and difference
    # rounded), it is 0, so that a neutral entry is never listed.
    rounding = 16 * np.finfo(np.float64).eps * (4 + sum(np.abs(term) for term in logs))
    delta = np.where(np.abs(delta) <= rounding, 0.0, delta)
    return delta / np.sqrt(1.0 / own + 1.0 / other)


# -- command line ----------------------------------------------------------------------


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m surgellm_kernels.vocabulary",
        description="Extract per-(task, class) word lists from labelled JSON-lines data "
        "(weighted log-odds with an informative Dirichlet prior) and write them "
        "as a LexicalFeaturizer file.",
    )
    parser.add_argument(
        "--data", required=True, help="JSON lines with text, label and task (the training format)"
    )
    parser.add_argument("--output", required=True, help="the JSON file to write")
    parser.add_argument("--top-k", type=int, default=10, help="entries per class (10)")
    parser.add_argument(
        "--min-count",
        type=int,
        default=5,
        help="leave out entries counted fewer times in a task's texts (5)",
    )
    parser.add_argument(
        "--max-words", type=int, default=2, help="entries are runs of 1 to this many words (2)"
    )
    parser.add_argument(
        "--prior",
        type=float,
        default=1.0,
        help="the prior's weight relative to the corpus counts (1.0)",
    )
    parser.add_argument(
        "--binary", action="store_true", help="count an entry once per text (document frequency)"
    )
    parser.add_argument(
        "--only-extracted",
        action="store_true",
        help="the featurizer's groups are the extracted ones only (default: "
        "the paper's groups, then the extracted ones)",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ._cli import fail
    from .data import DataError, LabelSpace, load_examples

    parser = build_parser()
    args = parser.parse_args(argv)
    # The options are checked before the data is read: a bad value is the
    # command line's fault, not the data's.
    flags = {
        "top_k": ("--top-k", args.top_k),
        "min_count": ("--min-count", args.min_count),
        "ngram_range": ("--max-words", args.max_words),
        "prior": ("--prior", args.prior),
    }
    try:
        _check_options(args.top_k, args.min_count, (1, args.max_words), args.prior, args.binary)
    except OptionError as e:
        flag, value = flags[e.name]
        return fail(f"argument {flag}: invalid value {value!r}: {e}", parser)
    try:
        examples = load_examples(args.data)
        LabelSpace.from_examples(examples, args.data)  # the training command's label checks
        by_task: Dict[str, Tuple[list, list]] = {}
        for text, task, label, is_int in zip(
            examples["text"], examples["task"], examples["label"], examples["label_is_int"]
        ):
            texts, labels = by_task.setdefault(task, ([], []))
            texts.append(text)
            labels.append(int(label) if is_int else label)  # classes in training's order
        vocabularies, groups = {}, {}
        for task, (texts, labels) in by_task.items():
            print(f"{task}: {len(texts)} texts", file=sys.stderr)
            try:
                extracted = extract_vocabulary(
                    texts,
                    labels,
                    top_k=args.top_k,
                    min_count=args.min_count,
                    ngram_range=(1, args.max_words),
                    prior=args.prior,
                    binary=args.binary,
                    progress=True,
                )
            except ValueError as e:
                raise DataError(f"{args.data}: task {task!r}: {e}") from None
            vocabularies[task] = {
                str(label): [entry._asdict() for entry in entries]
                for label, entries in extracted.items()
            }
            for label, entries in extracted.items():
                if entries:
                    name = f"{task}:{label}"
                    if name in groups:  # task "a" class "b:c" and task "a:b" class "c"
                        raise DataError(
                            f"{args.data}: two classes would both be the group {name!r} "
                            f"(task {task!r}, class {label!r}, and another): rename a task "
                            f"or class so that no ':' makes them alike"
                        )
                    groups[name] = [e.entry for e in entries]
        base = LexicalFeaturizer({} if args.only_extracted else None)
        featurizer = base.with_groups(groups)
        document = {
            "format": FORMAT,
            **featurizer.to_dict(),
            "extraction": {
                "data": os.fspath(args.data),
                "top_k": args.top_k,
                "min_count": args.min_count,
                "ngram_range": [1, args.max_words],
                "prior": args.prior,
                "binary": args.binary,
            },
            "vocabularies": vocabularies,
        }
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=2, ensure_ascii=False)
            f.write("\n")
    except (DataError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for task, per_class in vocabularies.items():
        for label, entries in per_class.items():
            shown = ", ".join(f"{e['entry']} ({e['z']:.1f})" for e in entries) or "(none)"
            print(f"{task}:{label}: {shown}")
    print(
        f"wrote {args.output}: {featurizer.num_features} features ({len(groups)} extracted groups)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
