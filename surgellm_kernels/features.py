"""Lexical features (paper Appendix D, Eq.4) and the task prefix (Eq.12).

Matching rule: text is lower-cased. A word entry matches where it stands as a
whole word: not preceded or followed by a letter, digit or underscore (so
"i" matches in "I'm" but not in "it"). An entry ending in ``*`` matches any
word that starts with it ("captivat*" matches "captivating"). Multi-word
entries match with any run of white space between their words. Entries that
begin or end with punctuation, like "(1)", match as plain substrings at that
edge. Each entry counts once however often it occurs (a presence indicator).

Words (s11, s12) are runs of word characters, apostrophes inside allowed
("don't" is one word of five characters). Sentences (s13) are the non-blank
pieces left after splitting on '.', '!' and '?'.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Sequence, Union

import torch

FEATURE_NAMES = (
    "sst_pos", "sst_neg", "llm_stat", "llm_formal", "llm_list",
    "human_pers", "human_hedge", "human_emo", "retrieval", "prompt_cot",
    "word_count", "mean_word_length", "sentence_count", "question_marks",
    "exclamation_marks", "has_digit",
)

WORD_GROUPS = {
    "sst_pos": ("great", "excellent", "brilliant", "terrific", "wonderful", "masterpiece",
                "captivat*", "impressive", "delightful", "superb"),
    "sst_neg": ("terrible", "awful", "dreadful", "unwatchable", "boring", "dull", "mediocre",
                "disappoint*", "worst", "painful"),
    "llm_stat": ("empirically", "statistically", "demonstrated", "observed", "evidenced",
                 "indicate*", "suggest*", "results show", "data show"),
    "llm_formal": ("moreover", "furthermore", "additionally", "consequently", "therefore",
                   "in conclusion", "in summary", "to summarize"),
    "llm_list": ("firstly", "secondly", "thirdly", "finally", "in addition",
                 "on the other hand", "(1)", "(2)", "(3)"),
    "human_pers": ("i", "my", "we", "our", "personally", "i think", "i believe", "i feel"),
    "human_hedge": ("maybe", "perhaps", "possibly", "kind of", "sort of", "i guess", "probably",
                    "somewhat", "arguably"),
    "human_emo": ("love", "hate", "amazing", "awesome", "terrible", "awful", "fantastic",
                  "horrible", "sad", "happy"),
    "retrieval": ("according to", "as stated in", "the article reports", "the text states",
                  "multi-hop", "supporting context", "in the passage"),
    "prompt_cot": ("step by step", "let us think", "first", "then", "next", "reasoning",
                   "the chain of thought", "walk through"),
}

_WORD = re.compile(r"\w+(?:'\w+)*")
_SENTENCE_SPLIT = re.compile(r"[.!?]")


def _entry_pattern(entry: str) -> re.Pattern:
    prefix = entry.endswith("*")
    body = entry[:-1] if prefix else entry
    pattern = r"\s+".join(re.escape(part) for part in body.split())
    if body[0].isalnum() or body[0] == "_":
        pattern = r"(?<!\w)" + pattern
    if prefix:
        pattern += r"\w*"
    elif body[-1].isalnum() or body[-1] == "_":
        pattern += r"(?!\w)"
    return re.compile(pattern)


_GROUP_PATTERNS = tuple(tuple(_entry_pattern(e) for e in entries)
                        for entries in WORD_GROUPS.values())


def _features_of(text: str) -> list:
    if not isinstance(text, str):
        raise TypeError(f"texts must hold strings, got {type(text).__name__}")
    lower = text.lower()
    values = [float(sum(1 for p in patterns if p.search(lower))) for patterns in _GROUP_PATTERNS]
    words = _WORD.findall(lower)
    values.append(float(len(words)))
    values.append(sum(len(w) for w in words) / len(words) if words else 0.0)
    values.append(float(sum(1 for piece in _SENTENCE_SPLIT.split(lower) if piece.strip())))
    values.append(float(text.count("?")))
    values.append(float(text.count("!")))
    values.append(1.0 if any(ch.isdigit() for ch in text) else 0.0)
    return values


def lexical_features(texts: Union[str, Iterable[str]]) -> torch.Tensor:
    """The 16 lexical features s1..s16 of each text, as a float32 (N, 16) tensor.

    Compute them on the full text, before any truncation of the encoder input.
    """
    if isinstance(texts, str):
        texts = [texts]
    rows = [_features_of(t) for t in texts]
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), len(FEATURE_NAMES))


def task_prefix(task: Union[int, str], features: Sequence[float]) -> str:
    """Eq.12: ``[TASK:<t>|F1:<v1>|...|F16:<v16>]`` with ``v_j = floor(s_j)``.

    ``task`` is printed as given (an id or a name); ``features`` are the raw
    features of one example (16 numbers, e.g. a row of :func:`lexical_features`).
    """
    values = features.tolist() if isinstance(features, torch.Tensor) else list(features)
    if len(values) != len(FEATURE_NAMES):
        raise ValueError(f"features must hold {len(FEATURE_NAMES)} numbers, got {len(values)}")
    parts = [f"F{j}:{math.floor(v)}" for j, v in enumerate(values, start=1)]
    return f"[TASK:{task}|" + "|".join(parts) + "]"
