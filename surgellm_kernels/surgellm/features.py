"""Lexical features (paper Appendix D, Eq.4) and the task prefix (Eq.12).

Matching rule: text is lower-cased. A word entry matches where it stands as a
whole word: not preceded or followed by a word character (below; so "i"
matches in "I'm" but not in "it"). An entry ending in ``*`` matches any
word that starts with it ("captivat*" matches "captivating"). Multi-word
entries match with any run of white space between their words. Entries that
begin or end with punctuation, like "(1)", match as plain substrings at that
edge. Each entry counts once however often it occurs (a presence indicator).

Text and entries are read in one Unicode form: composed (NFC, so "é"
matches however the text spells it), without the invisible characters that
would split a word (soft hyphen, word joiner, BOM; a zero-width space, a
break between words, reads as a space), and with typographic apostrophes as
"'" ("don’t" reads as "don't").

Word characters are Unicode's: letters, combining marks, decimal digits,
connector punctuation and the zero-width joiners, so that a Hindi or Thai
word with its vowel signs is one word (other number signs, "²" or "½", are
not). Words (s11, s12) are runs of word characters,
apostrophes inside allowed ("don't" is one word of five characters; s12
counts code points). Sentences (s13) are the non-blank pieces left after
splitting on '.', '!' and '?'. A digit (s16) is a decimal digit in any
script ("٣" is one, "²" and "①" are not), as in words.
"""

from __future__ import annotations

import json
import math
import numbers
import re
import unicodedata
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import regex
import torch

NUMERIC_FEATURE_NAMES = (
    "word_count",
    "mean_word_length",
    "sentence_count",
    "question_marks",
    "exclamation_marks",
    "has_digit",
)

WORD_GROUPS = {
    "sst_pos": (
        "great",
        "excellent",
        "brilliant",
        "terrific",
        "wonderful",
        "masterpiece",
        "captivat*",
        "impressive",
        "delightful",
        "superb",
    ),
    "sst_neg": (
        "terrible",
        "awful",
        "dreadful",
        "unwatchable",
        "boring",
        "dull",
        "mediocre",
        "disappoint*",
        "worst",
        "painful",
    ),
    "llm_stat": (
        "empirically",
        "statistically",
        "demonstrated",
        "observed",
        "evidenced",
        "indicate*",
        "suggest*",
        "results show",
        "data show",
    ),
    "llm_formal": (
        "moreover",
        "furthermore",
        "additionally",
        "consequently",
        "therefore",
        "in conclusion",
        "in summary",
        "to summarize",
    ),
    "llm_list": (
        "firstly",
        "secondly",
        "thirdly",
        "finally",
        "in addition",
        "on the other hand",
        "(1)",
        "(2)",
        "(3)",
    ),
    "human_pers": ("i", "my", "we", "our", "personally", "i think", "i believe", "i feel"),
    "human_hedge": (
        "maybe",
        "perhaps",
        "possibly",
        "kind of",
        "sort of",
        "i guess",
        "probably",
        "somewhat",
        "arguably",
    ),
    "human_emo": (
        "love",
        "hate",
        "amazing",
        "awesome",
        "terrible",
        "awful",
        "fantastic",
        "horrible",
        "sad",
        "happy",
    ),
    "retrieval": (
        "according to",
        "as stated in",
        "the article reports",
        "the text states",
        "multi-hop",
        "supporting context",
        "in the passage",
    ),
    "prompt_cot": (
        "step by step",
        "let us think",
        "first",
        "then",
        "next",
        "reasoning",
        "the chain of thought",
        "walk through",
    ),
}

FEATURE_NAMES = tuple(WORD_GROUPS) + NUMERIC_FEATURE_NAMES

# `regex`, not `re`: its \w is Unicode's word character, which takes in the
# combining marks that `re` leaves out (they would split most Indic words).
_WORD_CHARACTER = regex.compile(r"\w")
_WORD = regex.compile(r"\w+(?:'\w+)*")
# Words, and runs of other non-space characters between them: two words are
# adjacent in the text, with only white space between them (where a
# multi-word entry matches), when no such run stands between their tokens.
_TOKEN = regex.compile(r"\w+(?:'\w+)*|[^\w\s]+")
_SENTENCE_SPLIT = re.compile(r"[.!?]")


# A zero-width space marks a break between words (Thai, Khmer and Lao write
# no others): a space. The others join or hyphenate inside a word: dropped.
# The information separators U+001C-U+001F are white space to str.split
# (entries) but not to regex's \s (text): spaces, for both.
_INVISIBLE_AND_APOSTROPHES = str.maketrans(
    {"\u200b": " ", "\u00ad": None, "\u2060": None, "\ufeff": None, "\u2019": "'", "\u02bc": "'"}
    | {chr(c): " " for c in range(0x1C, 0x20)}
)


def canonical(text: str) -> str:
    """``text`` in the form features read it (module docstring); composed
    last, so that a dropped character leaves no decomposed letter."""
    return unicodedata.normalize("NFC", text.translate(_INVISIBLE_AND_APOSTROPHES))


def tokens(text: str) -> list:
    """The lower-cased words of ``text`` and the runs of punctuation between
    them, in order: the tokens :mod:`surgellm_kernels.vocabulary` counts
    (its entries are runs of adjacent words, so they match as entries here)."""
    return _TOKEN.findall(canonical(text).lower())


def is_word(token: str) -> bool:
    return _WORD.fullmatch(token) is not None


def _entry_pattern(entry: str) -> regex.Pattern:
    prefix = entry.endswith("*")
    body = entry[:-1] if prefix else entry
    pattern = r"\s+".join(regex.escape(part) for part in body.split())
    if _WORD_CHARACTER.fullmatch(body[0]):
        pattern = r"(?<!\w)" + pattern
    if prefix:
        pattern += r"\w*"
    elif _WORD_CHARACTER.fullmatch(body[-1]):
        pattern += r"(?!\w)"
    return regex.compile(pattern)


def _numeric_features(text: str) -> list:
    words = _WORD.findall(text)  # not of the lower case: "İ".lower() is two characters
    return [
        float(len(words)),
        sum(len(w) for w in words) / len(words) if words else 0.0,
        float(sum(1 for piece in _SENTENCE_SPLIT.split(text) if piece.strip())),
        float(text.count("?")),
        float(text.count("!")),
        1.0 if any(ch.isdecimal() for ch in text) else 0.0,  # a digit of a word: not "²"
    ]


class LexicalFeaturizer:
    """Lexical features over word groups given as data: per text, one count per
    group (how many of its entries occur, the matching rule above), then the
    six numeric features (word count ... has digit) when ``numeric``.

    ``LexicalFeaturizer()`` is the paper's: the Appendix D groups and the
    numeric features, the 16 of :func:`lexical_features`. ``groups`` maps a
    group name to its entries (in order); :meth:`with_groups` replaces groups
    or adds new ones (e.g. lists from
    :func:`surgellm_kernels.vocabulary.extract_vocabulary`); :meth:`to_json`
    / :meth:`from_json` save and restore it, as ``SurgeLLMModel`` does with the
    lists it was trained with.
    """

    def __init__(self, groups: Optional[Mapping[str, Sequence[str]]] = None, numeric: bool = True):
        groups = WORD_GROUPS if groups is None else groups
        if not isinstance(groups, Mapping):
            raise TypeError(
                f"groups must map a group name to its entries, got {type(groups).__name__}"
            )
        if not isinstance(numeric, bool):
            raise TypeError(f"numeric must be a bool, got {numeric!r}")
        checked = {}
        for name, entries in groups.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"group names must be non-empty strings, got {name!r}")
            if numeric and name in NUMERIC_FEATURE_NAMES:
                raise ValueError(f"group name {name!r} is the name of a numeric feature")
            if isinstance(entries, str) or not isinstance(entries, Sequence) or not entries:
                raise ValueError(
                    f"groups[{name!r}] must be a non-empty list of entries, got {entries!r}"
                )
            normalized = []
            for entry in entries:
                # matched lower-case, any run of white space between words
                # (checked after: canonical drops invisible characters, a soft hyphen)
                given = entry
                if isinstance(entry, str):
                    entry = " ".join(canonical(entry).lower().split())
                if not isinstance(given, str) or entry.rstrip("*") == "":
                    raise ValueError(
                        f"groups[{name!r}]: entries must be non-empty strings, got {given!r}"
                    )
                if entry in normalized:
                    raise ValueError(
                        f"groups[{name!r}] lists {entry!r} twice (entries are "
                        f"matched in lower case and one Unicode form)"
                    )
                normalized.append(entry)
            checked[name] = tuple(normalized)
        if not checked and not numeric:
            raise ValueError("a featurizer needs at least one group or numeric=True")
        self._groups = checked
        self.numeric = numeric
        self._patterns = tuple(
            tuple(_entry_pattern(e) for e in entries) for entries in checked.values()
        )

    @property
    def groups(self) -> Dict[str, Tuple[str, ...]]:
        return dict(self._groups)

    @property
    def feature_names(self) -> Tuple[str, ...]:
        return tuple(self._groups) + (NUMERIC_FEATURE_NAMES if self.numeric else ())

    @property
    def num_features(self) -> int:
        return len(self.feature_names)

    def with_groups(self, groups: Mapping[str, Sequence[str]]) -> "LexicalFeaturizer":
        """A featurizer with ``groups`` replacing the groups of the same name
        (in place) and the others added after the existing ones."""
        if not isinstance(groups, Mapping):
            raise TypeError(
                f"groups must map a group name to its entries, got {type(groups).__name__}"
            )
        return LexicalFeaturizer({**self._groups, **groups}, numeric=self.numeric)

    def features_of(self, text: str) -> List[float]:
        if not isinstance(text, str):
            raise TypeError(f"texts must hold strings, got {type(text).__name__}")
        text = canonical(text)
        lower = text.lower()
        values = [float(sum(1 for p in patterns if p.search(lower))) for patterns in self._patterns]
        if self.numeric:
            values += _numeric_features(text)
        return values

    def __call__(self, texts: Union[str, Iterable[str]]) -> torch.Tensor:
        """The features of each text, as a float32 (N, num_features) tensor.
        Compute them on the full text, before any truncation of the encoder
        input."""
        if isinstance(texts, str):
            texts = [texts]
        rows = [self.features_of(t) for t in texts]
        return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), self.num_features)

    def to_dict(self) -> dict:
        return {
            "groups": {name: list(entries) for name, entries in self._groups.items()},
            "numeric": self.numeric,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "LexicalFeaturizer":
        if not isinstance(data, Mapping) or "groups" not in data:
            raise ValueError(
                "a featurizer's JSON must be an object with 'groups' (and optionally 'numeric')"
            )
        # (a vocabulary file adds what it was extracted from)
        unknown = set(data) - {"groups", "numeric", "format", "extraction", "vocabularies"}
        if unknown:
            raise ValueError(
                f"a featurizer's JSON has unknown keys {sorted(unknown)}: it takes 'groups' "
                f"and 'numeric'"
            )
        if not isinstance(data["groups"], Mapping):  # None would mean the paper's groups
            raise ValueError(
                f"'groups' must be an object mapping each group name to its entries, got "
                f"{data['groups']!r:.40}"
            )
        return cls(data["groups"], numeric=data.get("numeric", True))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "LexicalFeaturizer":
        """From :meth:`to_json`'s text, or from a vocabulary file written by
        ``python -m surgellm_kernels.vocabulary`` (its ``groups``)."""
        return cls.from_dict(json.loads(text, object_pairs_hook=_without_repeated_keys))

    def __eq__(self, other) -> bool:
        # the groups' order is the features' order
        return (
            isinstance(other, LexicalFeaturizer)
            and self.numeric == other.numeric
            and list(self._groups.items()) == list(other._groups.items())
        )

    def __repr__(self) -> str:
        return (
            f"LexicalFeaturizer({len(self._groups)} groups, numeric={self.numeric}, "
            f"{self.num_features} features)"
        )


def _without_repeated_keys(pairs, repeated="the JSON gives {key!r} twice in one object") -> dict:
    """A JSON object's (or any list's) [key, value] pairs as a dict, in
    order; a key given twice is an error, ``repeated`` its message (JSON
    readers and ``dict`` keep the last, and a group written twice would lose
    one)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(repeated.format(key=key))
        out[key] = value
    return out


DEFAULT_FEATURIZER = LexicalFeaturizer()


def lexical_features(texts: Union[str, Iterable[str]]) -> torch.Tensor:
    """The 16 lexical features s1..s16 of each text, as a float32 (N, 16) tensor
    (the paper's :class:`LexicalFeaturizer`).

    Compute them on the full text, before any truncation of the encoder input.
    """
    return DEFAULT_FEATURIZER(texts)


def task_prefix(
    task: Union[int, str], features: Sequence[float], num_features: int = len(FEATURE_NAMES)
) -> str:
    """Eq.12: ``[TASK:<t>|F1:<v1>|...|F16:<v16>]`` with ``v_j = floor(s_j)``.

    ``task`` is printed as given (an id or a name); ``features`` are the raw
    features of one example (a row of :func:`lexical_features`, 16 numbers;
    with another :class:`LexicalFeaturizer`, pass its ``num_features``).
    """
    values = features.tolist() if hasattr(features, "tolist") else features  # tensor, array
    values = list(values) if isinstance(values, Iterable) else [values]
    if len(values) != num_features or not all(isinstance(v, numbers.Real) for v in values):
        raise ValueError(
            f"features must be one row of {num_features} numbers, got {str(values)[:60]}"
        )
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"features must be finite (counts), got {values}")
    parts = [f"F{j}:{math.floor(v)}" for j, v in enumerate(values, start=1)]
    return f"[TASK:{task}|" + "|".join(parts) + "]"
