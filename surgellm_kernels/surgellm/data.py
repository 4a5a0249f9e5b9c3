"""JSON-lines data for the training and evaluation commands.

One example per line, an object with a string ``text``, a non-empty string
``task`` and a ``label`` that is an int or a string (other fields are
ignored); blank lines are skipped::

    {"text": "Not great, not even good, just long.", "label": "negative", "task": "sentiment"}

Every problem raises :class:`DataError` with a message of the form
``"<path>:<line>: <what is wrong>"``. A :class:`LabelSpace` (built from the
training examples, or from a saved model's class names) maps labels to class
indices. Nothing here prints.
"""
from __future__ import annotations

import json
import os
from typing import (Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple,
                    Union)

import torch

__all__ = ["DataError", "Example", "LabelSpace", "read_examples", "prepare_all",
           "select_rows", "prepare_batches"]

Label = Union[int, str]
# A task name goes inside the prefix's brackets (see model.py): no white
# space, '|', '[' or ']'.
_BAD_TASK_CHARS = set("|[]")
# what model.prepare returns besides the tokenizer's (B, L) outputs
_ROW_KEYS = ("features", "task_ids", "labels")


class DataError(ValueError):
    """Bad data; the message starts with ``<path>:<line>:`` (or ``<path>:``)."""


class Example(NamedTuple):
    text: str
    task: str
    label: Label
    line: int


def _error(path, line: Optional[int], what: str) -> DataError:
    where = f"{path}:{line}" if line else f"{path}"
    return DataError(f"{where}: {what}")


def _type_name(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "an int", float: "a float", type(None): "null"}.get(type(value),
                                                                     type(value).__name__)


def read_examples(path: Union[str, os.PathLike]) -> List[Example]:
    """The examples of the JSON-lines file ``path``, checked (see the module
    docstring); raises :class:`DataError` on the first problem."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw_lines = f.read().splitlines()
    except OSError as exc:
        raise _error(path, None, f"cannot read the file: {exc.strerror or exc}") from None
    examples = []
    for number, raw in enumerate(raw_lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _error(path, number, f"not valid UTF-8 ({exc.reason} at byte {exc.start})") \
                from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _error(path, number, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(record, dict):
            raise _error(path, number, f"expected a JSON object, got {_type_name(record)}")
        for field in ("text", "task", "label"):
            if field not in record:
                raise _error(path, number, f'missing field "{field}"')
        text, task, label = record["text"], record["task"], record["label"]
        if not isinstance(text, str):
            raise _error(path, number, f'field "text" must be a string, got {_type_name(text)}')
        if not isinstance(task, str) or not task:
            got = "an empty string" if task == "" else _type_name(task)
            raise _error(path, number, f'field "task" must be a non-empty string, got {got}')
        if any(c.isspace() or c in _BAD_TASK_CHARS for c in task):
            raise _error(path, number, f"task name {task!r} may not contain white space, "
                                       f"'|', '[' or ']'")
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise _error(path, number, f'field "label" must be an int or a string, got '
                                       f"{_type_name(label)}")
        examples.append(Example(text, task, label, number))
    if not examples:
        raise _error(path, None, "no examples (the file is empty)")
    return examples


class LabelSpace:
    """Tasks (in order of first appearance) and each task's classes (sorted:
    ints numerically, strings lexicographically), as seen in training data.

    Labels are matched by their string form (``3`` and ``"3"`` are the same
    class), which is how a saved model names its classes."""

    def __init__(self, classes: Mapping[str, Sequence[Label]]):
        self.classes: Dict[str, List[Label]] = {t: list(c) for t, c in classes.items()}
        self._index = {t: {str(c): i for i, c in enumerate(c)}
                       for t, c in self.classes.items()}

    @classmethod
    def from_examples(cls, examples: Sequence[Example], path) -> "LabelSpace":
        """The label space of training ``examples`` read from ``path``. A task
        mixing int and str labels, or with a single class, is an error."""
        if not examples:
            raise _error(path, None, "no examples")
        seen: Dict[str, Dict[Label, None]] = {}
        first: Dict[str, Example] = {}
        for ex in examples:
            if ex.task not in first:
                first[ex.task], seen[ex.task] = ex, {}
            elif isinstance(ex.label, int) != isinstance(first[ex.task].label, int):
                head = first[ex.task]
                raise _error(path, ex.line,
                             f"task {ex.task!r} mixes int and string labels: label {ex.label!r} "
                             f"here, label {head.label!r} on line {head.line}")
            seen[ex.task][ex.label] = None
        for task, labels in seen.items():
            if len(labels) < 2:
                raise _error(path, first[task].line,
                             f"task {task!r} has a single class ({first[task].label!r}) in the "
                             f"training data; a task needs at least 2")
        return cls({t: sorted(labels) for t, labels in seen.items()})

    @classmethod
    def from_class_names(cls, class_names: Mapping[str, Sequence[str]]) -> "LabelSpace":
        """The label space of a saved model (its ``config.class_names``)."""
        return cls(class_names)

    @property
    def tasks(self) -> List[str]:
        return list(self.classes)

    def class_names(self) -> Dict[str, List[str]]:
        """Task name -> class names, for ``SurgeLLMModel.from_encoder``."""
        return {t: [str(c) for c in classes] for t, classes in self.classes.items()}

    def encode(self, examples: Sequence[Example], path) -> List[Tuple[str, int]]:
        """``(task, class index)`` of each example read from ``path``; an
        unknown task or a label not seen in training is an error."""
        encoded = []
        for ex in examples:
            index = self._index.get(ex.task)
            if index is None:
                raise _error(path, ex.line, f"unknown task {ex.task!r} (training tasks: "
                                            f"{', '.join(self.tasks)})")
            i = index.get(str(ex.label))
            if i is None:
                raise _error(path, ex.line, f"label {ex.label!r} of task {ex.task!r} does not "
                                            f"occur in the training data")
            encoded.append((ex.task, i))
        return encoded


# -- model inputs ---------------------------------------------------------------------------
def prepare_batches(model, texts: Sequence[str], tasks: Sequence[str],
                    labels: Optional[Sequence[int]] = None, batch_size: int = 16,
                    device=None) -> Iterator[Dict[str, torch.Tensor]]:
    """``model.prepare`` of consecutive batches of ``batch_size`` rows."""
    for i in range(0, len(texts), batch_size):
        yield model.prepare(texts[i:i + batch_size], tasks[i:i + batch_size],
                            None if labels is None else labels[i:i + batch_size], device=device)


def prepare_all(model, texts: Sequence[str], tasks: Sequence[str],
                labels: Optional[Sequence[int]] = None) -> Dict[str, torch.Tensor]:
    """Every row tokenized once (padded to the longest); take batches of it
    with :func:`select_rows`."""
    return model.prepare(list(texts), list(tasks), None if labels is None else list(labels))


def select_rows(prepared: Mapping[str, torch.Tensor], rows: torch.Tensor,
                device=None) -> Dict[str, torch.Tensor]:
    """Rows ``rows`` of :func:`prepare_all`'s output, without the token
    columns that are padding in all of them (what ``model.prepare`` of those
    rows alone would give), on ``device``."""
    keep = prepared["attention_mask"][rows].any(0)
    batch = {}
    for name, value in prepared.items():
        value = value[rows]
        if name not in _ROW_KEYS:  # a token column per position
            value = value[:, keep]
        batch[name] = value if device is None else value.to(device)
    return batch
