"""JSON-lines data for the training and evaluation commands, as ``datasets`` tables.

One example per line, an object with a string ``text``, a non-empty string
``task`` and a ``label`` that is an int or a string (other fields are
ignored); blank lines are skipped::

    {"text": "Not great, not even good, just long.", "label": "negative", "task": "sentiment"}

Every problem raises :class:`DataError` with a message of the form
``"<path>:<line>: <what is wrong>"``. A :class:`LabelSpace` (built from the
training data, or from a saved model's class names) maps labels to class
indices. Nothing here prints.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Dict, List, Mapping, Optional, Sequence, Union

from .features import _without_repeated_keys

__all__ = ["DataError", "LabelSpace", "load_examples"]

Label = Union[int, str]
FIELDS = ("text", "task", "label")
# A task name goes inside the prefix's brackets: no white space, '|', '[' or ']'.
_BAD_TASK_CHARS = set("|[]")


class DataError(ValueError):
    """Bad data; the message starts with ``<path>:<line>:`` (or ``<path>:``)."""


def check_metric_task_names(task_names: Sequence[str]) -> None:
    """``Trainer`` names evaluation metrics ``eval_<key>`` unless the key
    starts with ``eval_``: the metrics of a task named ``eval`` or ``eval_...``
    would pass for the mean's (``eval_macro_f1``) or another task's."""
    for task in task_names:
        if task == "eval" or task.startswith("eval_"):
            raise ValueError(
                f"task {task!r}: Trainer reads metrics named eval or eval_... as its own "
                "(the mean macro-F1 is eval_macro_f1), so this task's would pass for another's; "
                "rename the task"
            )


def _where(path, line: Optional[int]) -> str:
    return f"{path}:{line}" if line else f"{path}"


def _type_name(value) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "an int",
        float: "a float",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _row_problem(record) -> Optional[str]:
    """What is wrong with one parsed line, or None."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {_type_name(record)}"
    for field in FIELDS:
        if field not in record:
            return f'missing field "{field}"'
    text, task, label = (record[f] for f in FIELDS)
    if not isinstance(text, str):
        return f'field "text" must be a string, got {_type_name(text)}'
    if not isinstance(task, str) or not task:
        got = "an empty string" if task == "" else _type_name(task)
        return f'field "task" must be a non-empty string, got {got}'
    if any(c.isspace() or c in _BAD_TASK_CHARS for c in task):
        return f"task name {task!r} may not contain white space, '|', '[' or ']'"
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        return f'field "label" must be an int or a string, got {_type_name(label)}'
    for field in FIELDS:  # an escaped lone surrogate (\ud800) is no text UTF-8 can hold
        value = record[field]
        if isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                return (
                    f'field "{field}" holds {value[exc.start]!r} at character {exc.start}, '
                    "a lone surrogate: not text"
                )
    return None


def _parse(path: str):
    """The ``datasets.map`` function that turns the lines of ``path`` (rows of
    the ``text`` loader, in file order) into checked examples."""

    def parse(batch, indices):
        out = {"text": [], "task": [], "label": [], "label_is_int": [], "line": []}
        for raw, index in zip(batch["text"], indices):
            if index == 0:
                raw = raw.removeprefix("\ufeff")  # a byte-order mark (UTF-8 with BOM)
            if not raw.strip():
                continue
            line = index + 1
            try:
                record = json.loads(raw, object_pairs_hook=_without_repeated_keys)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{_where(path, line)}: invalid JSON: {exc.msg} (column {exc.colno})"
                ) from None
            except ValueError as exc:  # a key given twice: which one would count?
                raise DataError(f"{_where(path, line)}: {exc}") from None
            except RecursionError:
                raise DataError(f"{_where(path, line)}: invalid JSON: nested too deeply") from None
            problem = _row_problem(record)
            if problem:
                raise DataError(f"{_where(path, line)}: {problem}")
            label = record["label"]
            out["text"].append(record["text"])
            out["task"].append(record["task"])
            out["label"].append(str(label))
            out["label_is_int"].append(isinstance(label, int))
            out["line"].append(line)
        return out

    return parse


@contextlib.contextmanager
def quiet_datasets():
    """``datasets``' progress bars off inside (the library prints nothing),
    as they were after."""
    import datasets

    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if shown:
            datasets.enable_progress_bars()


def load_examples(path: Union[str, os.PathLike]):
    """The examples of the JSON-lines file ``path``, checked (see the module
    docstring): a ``datasets.Dataset`` with the columns ``text``, ``task``,
    ``label`` (as text), ``label_is_int`` and ``line`` (for messages).
    The file is read as it is now, by its own name (no pattern, no cache);
    its lines end at \\n, \\r\\n or \\r, as editors count them. Each is
    parsed and checked where its line number is known, so that a bad one is
    named (a JSON reader over the whole file names none, and wants one type
    per field)."""
    import datasets

    path = os.fspath(path)
    if not os.path.isfile(path):
        why = "it is a directory" if os.path.isdir(path) else "no such file"
        raise DataError(f"{path}: cannot read the file: {why}")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.removesuffix("\n") for line in f]
    except UnicodeDecodeError as exc:
        line, column = _first_undecodable(path)
        raise DataError(
            f"{_where(path, line)}: not UTF-8 text: byte {column} of the line "
            f"cannot be decoded ({exc.reason}); save the file as UTF-8"
        ) from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file: {exc.strerror or exc}") from None
    if not lines:
        raise DataError(f"{path}: no examples (the file is empty)")
    with quiet_datasets():
        data = datasets.Dataset.from_dict({"text": lines}).map(
            _parse(path),
            batched=True,
            with_indices=True,
            remove_columns=["text"],
            keep_in_memory=True,
        )
    if len(data) == 0:
        raise DataError(f"{path}: no examples (the file is empty)")
    return data


def _first_undecodable(path: str):
    """(line, byte within it, from 1) of the first bytes of ``path`` that are
    not UTF-8; (None, None) if there are none."""
    with open(path, "rb") as f:
        lines = re.split(rb"\r\n|\r|\n", f.read())  # the line ends load_examples reads
    for number, raw in enumerate(lines, start=1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return number, exc.start + 1
    return None, None


def _shown(label: str, is_int: bool) -> str:
    """A label as its JSON line wrote it: 3, or 'three'."""
    return label if is_int else repr(label)


class LabelSpace:
    """Tasks (in order of first appearance) and each task's classes (sorted:
    ints numerically, strings lexicographically), as seen in training data.

    Labels are matched by their string form (``3`` and ``"3"`` are the same
    class), which is how a saved model names its classes."""

    def __init__(self, classes: Mapping[str, Sequence[Label]]):
        self.classes: Dict[str, List[Label]] = {t: list(c) for t, c in classes.items()}
        self._index = {t: {str(c): i for i, c in enumerate(c)} for t, c in self.classes.items()}

    @classmethod
    def from_examples(cls, examples, path) -> "LabelSpace":
        """The label space of training ``examples`` (``load_examples``) read
        from ``path``. A task mixing int and string labels, or with a single
        class, is an error."""
        seen: Dict[str, Dict[Label, None]] = {}
        first: Dict[str, tuple] = {}
        for task, text, is_int, line in zip(
            examples["task"], examples["label"], examples["label_is_int"], examples["line"]
        ):
            label = int(text) if is_int else text
            if task in first and isinstance(first[task][0], int) != is_int:
                head, head_line = first[task]
                raise DataError(
                    f"{_where(path, line)}: task {task!r} mixes int and string "
                    f"labels: label {label!r} here, label {head!r} on line "
                    f"{head_line}"
                )
            seen.setdefault(task, {})[label] = None
            first.setdefault(task, (label, line))
        for task, labels in seen.items():
            if len(labels) < 2:
                label, line = first[task]
                raise DataError(
                    f"{_where(path, line)}: task {task!r} has a single class "
                    f"({label!r}) in the training data; a task needs at least 2"
                )
        return cls({t: sorted(labels) for t, labels in seen.items()})

    @property
    def tasks(self) -> List[str]:
        return list(self.classes)

    def class_names(self) -> Dict[str, List[str]]:
        """Task name -> class names (what ``from_encoder`` takes as tasks)."""
        return {t: [str(c) for c in classes] for t, classes in self.classes.items()}

    def encode(self, examples, path) -> List[int]:
        """Each example's class index within its task; an unknown task or a
        label not seen in training is a :class:`DataError`."""
        encoded = []
        for task, label, is_int, line in zip(
            examples["task"], examples["label"], examples["label_is_int"], examples["line"]
        ):
            index = self._index.get(task)
            if index is None:
                raise DataError(
                    f"{_where(path, line)}: unknown task {task!r} (training "
                    f"tasks: {', '.join(self.tasks)})"
                )
            i = index.get(label)  # labels are matched by their text
            if i is None:
                known = ", ".join(_shown(str(c), isinstance(c, int)) for c in self.classes[task])
                raise DataError(
                    f"{_where(path, line)}: label {_shown(label, is_int)} of task "
                    f"{task!r} does not occur in the training data (its classes: {known}; "
                    "labels are matched as written, not as class indices)"
                )
            encoded.append(i)
        return encoded
