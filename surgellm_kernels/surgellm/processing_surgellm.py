"""``SurgeLLMProcessor``: texts and task names to SURGELLM model inputs."""

from __future__ import annotations

import operator
import os
import warnings
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor
from transformers import AutoConfig, AutoTokenizer

from .configuration_surgellm import SurgeLLMConfig
from .data import DataError, _where, quiet_datasets
from .features import task_prefix

__all__ = ["SurgeLLMProcessor"]


class SurgeLLMProcessor:
    """The tokenizer (with the prefix tokens), the lexical featurizer and the
    task names of one SURGELLM model.

    ``processor(texts, tasks, labels=None)`` (labels: class ids, or class
    names where the model has them) returns the model's inputs:
    ``input_ids``, ``attention_mask`` (and ``token_type_ids`` where the
    tokenizer makes them) of the prefixed texts, ``features`` (the lexical
    features of the full text, before truncation), ``task_ids`` and
    ``labels``. Truncation cuts the end of the text, never the prefix: a
    ``max_seq_length`` too short for the prefix and one text token is an
    error.
    """

    def __init__(self, tokenizer, config: SurgeLLMConfig, _saved: bool = False):
        if config.prefix:
            from .modeling_surgellm import prefix_tokens

            vocab = tokenizer.get_vocab()
            missing = [t.content for t in prefix_tokens(config) if t.content not in vocab]
            if missing and _saved:  # trained so: its markers were pieces then too
                warnings.warn(
                    f"this model's tokenizer lacks {len(missing)} of its prefix tokens (e.g. "
                    f"{missing[0]!r}): it was trained with each marker cut into pieces, and "
                    "is read so",
                    stacklevel=3,
                )
            elif missing:  # it would cut each marker into pieces the model never saw
                raise ValueError(
                    f"tokenizer lacks {len(missing)} of the model's prefix tokens (e.g. "
                    f"{missing[0]!r}): give SurgeLLMForSequenceClassification.from_encoder "
                    "the tokenizer (tokenizer=...), which it adds them to, and build the "
                    "processor with that one; for a saved model, use "
                    "SurgeLLMProcessor.from_pretrained(<the model's directory>)"
                )
        # the first token is the pooled one, and truncation must cut the text's
        # end, never the prefix in front (set once the tokenizer is taken)
        tokenizer.padding_side = tokenizer.truncation_side = "right"
        self.tokenizer, self.config = tokenizer, config
        self.featurizer = config.featurizer()

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike]) -> "SurgeLLMProcessor":
        """The processor of a model saved with ``save_pretrained`` (the
        model's directory, where :meth:`save_pretrained` wrote the tokenizer)."""
        if not os.path.isfile(os.path.join(directory, "config.json")) and os.path.isdir(directory):
            raise ValueError(
                f"{directory} holds no config.json: SurgeLLMProcessor.from_pretrained reads the "
                f"model's config (save the model there too, or the processor with "
                f"save_pretrained, which writes it)"
            )
        config = AutoConfig.from_pretrained(directory)
        if not isinstance(config, SurgeLLMConfig):
            raise ValueError(f"{directory} holds a {type(config).__name__}, not a SURGELLM model")
        return cls(AutoTokenizer.from_pretrained(directory), config, _saved=True)

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> None:
        """The tokenizer, and the config where the model has not written its
        own (a directory :meth:`from_pretrained` then reads alone)."""
        self.tokenizer.save_pretrained(directory)
        if not os.path.isfile(os.path.join(directory, "config.json")):
            self.config.save_pretrained(directory)

    def task_ids(self, tasks: Sequence[Union[str, int]]) -> Tensor:
        """Task ids of task names (or ids, checked)."""
        names = self.config.task_names
        ids = []
        for i, t in enumerate(tasks):
            if isinstance(t, str):
                if t not in self.config.tasks:
                    raise ValueError(f"tasks[{i}]: unknown task {t!r}; this model has {names}")
                ids.append(names.index(t))
            elif (index := _integer(t)) is not None and 0 <= index < len(names):
                ids.append(index)
            else:
                raise ValueError(
                    f"tasks[{i}] must be a task name or an id in [0, {len(names)}), got {t!r}"
                )
        return torch.tensor(ids, dtype=torch.long)

    def __call__(
        self,
        texts: Sequence[str],
        tasks: Sequence[Union[str, int]],
        labels: Optional[Sequence[int]] = None,
        padding: Union[bool, str] = True,
        return_tensors: Optional[str] = "pt",
    ) -> Dict[str, Union[Tensor, List]]:
        """Model inputs for ``texts`` of ``tasks`` (see the class docstring);
        ``padding=False, return_tensors=None`` gives lists, for a data
        collator to pad later."""
        # numpy arrays and pandas Series, as lists (they have no truth value)
        texts, tasks = (v.tolist() if hasattr(v, "tolist") else v for v in (texts, tasks))
        if labels is not None and not isinstance(labels, Tensor) and hasattr(labels, "tolist"):
            labels = labels.tolist()
        if isinstance(texts, str) or len(texts) != len(tasks):
            raise ValueError(
                f"texts and tasks must be sequences of one length, got "
                f"{type(texts).__name__} and {len(tasks)} tasks"
            )
        if not texts:
            raise ValueError("texts is empty")
        sides = (self.tokenizer.padding_side, self.tokenizer.truncation_side)
        if sides != ("right", "right"):
            # set after the processor was built (which sets both)
            raise ValueError(
                f"the tokenizer pads on the {sides[0]} and truncates on the {sides[1]}: "
                f"SURGELLM reads the first token and puts the prefix in front, so both must "
                f"be 'right' (tokenizer.padding_side = tokenizer.truncation_side = 'right')"
            )
        task_ids = self.task_ids(tasks)
        features = self.featurizer(texts)
        if self.config.prefix:
            names, n = self.config.task_names, features.shape[1]
            prefixes = [
                task_prefix(names[t], row, n) for t, row in zip(task_ids.tolist(), features)
            ]
            self._check_prefix_fits(prefixes)
            texts = [f"{p} {t}" for p, t in zip(prefixes, texts)]
        batch = dict(
            self.tokenizer(
                list(texts),
                padding=padding,
                truncation=True,
                max_length=self.config.max_seq_length,
                return_tensors=return_tensors,
            )
        )
        batch.update(features=features, task_ids=task_ids)
        if labels is not None:
            labels = self._class_ids(labels, task_ids)
            # as_tensor makes [True, 1] int64: a bool among ints is refused too
            if isinstance(labels, Sequence) and any(isinstance(v, bool) for v in labels):
                raise TypeError("labels must be integer class ids, got a bool among them")
            labels = torch.as_tensor(labels)
            if labels.numel() and not _is_integer_dtype(labels.dtype):
                # (as_tensor(dtype=long) would truncate 0.7 to class 0)
                raise TypeError(f"labels must be integer class ids, got {labels.dtype} values")
            batch["labels"] = labels.long()
            self.config.check_labels(batch["labels"], task_ids)
        if return_tensors is None:
            batch = {k: v.tolist() if isinstance(v, Tensor) else v for k, v in batch.items()}
        return batch

    def _class_ids(self, labels, task_ids: Tensor):
        """Labels as given, class names (as ``decode`` gives them) turned into
        their task's class ids."""
        if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
            return labels
        if not any(isinstance(label, str) for label in labels):
            return labels
        if len(labels) != len(task_ids):
            raise ValueError(f"labels must be {len(task_ids)} labels, one per text")
        names = self.config.task_names
        ids = []
        for i, (label, t) in enumerate(zip(labels, task_ids.tolist())):
            classes = (self.config.class_names or {}).get(names[t])
            if not isinstance(label, str):
                ids.append(label)
            elif classes is None:
                raise ValueError(
                    f"labels[{i}]={label!r} is a class name, and task {names[t]!r} has none: "
                    f"pass class ids (0 <= label < {self.config.tasks[names[t]]})"
                )
            elif label not in classes:
                raise ValueError(
                    f"labels[{i}]={label!r} is not a class of task {names[t]!r}: {classes}"
                )
            else:
                ids.append(classes.index(label))
        return ids

    def _check_prefix_fits(self, prefixes: List[str]) -> None:
        tokens = self.tokenizer(prefixes, add_special_tokens=False)["input_ids"]
        lengths = [len(ids) for ids in tokens]
        longest = max(lengths)
        needed = longest + self.tokenizer.num_special_tokens_to_add() + 1
        if needed > self.config.max_seq_length:
            raise _PrefixTooLong(
                lengths.index(longest),
                f"max_seq_length={self.config.max_seq_length} cannot hold the task "
                f"prefix ({longest} tokens) and any text: use a max_seq_length of "
                f"at least {needed} (the training command's --max-length)",
            )

    def map(self, rows, labels: Sequence[int], source: Optional[str] = None):
        """A ``datasets.Dataset`` of ``text`` and ``task`` columns, with the
        class index of each row in ``labels``, as unpadded model inputs (a
        data collator such as ``DataCollatorWithPadding`` pads each batch).
        A row whose task prefix leaves no room for its text raises
        ``ValueError`` naming the row; with ``source``, the file ``rows`` were
        read from (``load_examples``), ``DataError`` naming its file and line."""

        def encode(batch, indices):
            try:
                return self(
                    batch["text"],
                    batch["task"],
                    [labels[i] for i in indices],
                    padding=False,
                    return_tensors=None,
                )
            except _PrefixTooLong as exc:
                if source is None:
                    raise ValueError(f"rows[{indices[exc.index]}]: {exc}") from None
                line = batch["line"][exc.index] if "line" in batch else None
                raise DataError(f"{_where(source, line)}: {exc}") from None

        with quiet_datasets():
            return rows.map(
                encode,
                batched=True,
                with_indices=True,
                remove_columns=rows.column_names,
                keep_in_memory=True,
            )

    def decode(self, logits: Tensor, task_ids) -> List:
        """Each row's predicted class: its name when the config names them.
        ``logits``: the model's (B, max classes); ``task_ids``: one task (id
        or name) per row."""
        width = self.config.max_classes
        if isinstance(logits, np.ndarray):  # Trainer.predict's predictions
            logits = torch.from_numpy(logits)
        if not isinstance(logits, Tensor):
            raise TypeError(f"logits must be a tensor, got {type(logits).__name__}")
        if logits.dim() != 2 or logits.shape[1] != width:
            raise ValueError(
                f"logits must be the model's, of shape (batch, {width}), got {tuple(logits.shape)}"
            )
        ids = self.task_ids(task_ids)
        if len(ids) != len(logits):
            raise ValueError(
                f"task_ids must hold one task per row of logits ({len(logits)}), got {len(ids)}"
            )
        predictions = logits.argmax(-1).tolist()
        names = self.config.class_names
        if names is None:
            return predictions
        tasks = self.config.task_names
        return [names[tasks[t]][p] for t, p in zip(ids.tolist(), predictions)]


class _PrefixTooLong(ValueError):
    """The task prefix of row ``index`` of a call leaves no room for text."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _integer(value) -> Optional[int]:
    """``value`` as an int if it is one (an int, a numpy integer, a 0-d
    integer tensor), else None; a bool is not a task id."""
    if isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None
