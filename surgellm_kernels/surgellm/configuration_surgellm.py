"""SURGELLM's configuration, a ``transformers`` config (``model_type = "surgellm"``)."""

from __future__ import annotations

import contextlib
import inspect
import re
from typing import Dict, List, Mapping, Optional, Union

from transformers import AutoConfig, PretrainedConfig

from .features import LexicalFeaturizer, _without_repeated_keys

__all__ = ["SurgeLLMConfig"]

# A task name appears inside the prefix's brackets: it may not contain them,
# the field separator or white space.
_TASK_NAME = re.compile(r"[^\s|\[\]]+")


def _pairs_to_dict(pairs, what: str) -> dict:
    """[name, value] pairs (a saved config's form) as a dict, in order; a name
    given twice is an error, not the last one kept."""
    return _without_repeated_keys(
        pairs, what + " name {key!r} more than once: each must be given once"
    )


def _as_id2label(value, inverse: bool = False) -> Optional[Dict[int, str]]:
    """{int id: str name} of an id2label (or, ``inverse``, a label2id), or
    None where it is not one."""
    if not isinstance(value, Mapping):
        return None
    pairs = [(v, k) for k, v in value.items()] if inverse else list(value.items())
    try:
        return {int(i): str(name) for i, name in pairs}
    except (TypeError, ValueError):
        return None


def _generic(id2label: Dict[int, str]) -> bool:
    """transformers' default names: LABEL_0, LABEL_1, ..."""
    return sorted(id2label) == list(range(len(id2label))) and all(
        name == f"LABEL_{i}" for i, name in id2label.items()
    )


# The config's numeric fields: what each must be.
_NUMBERS = {
    "alpha": (lambda v: v == v, "a number"),
    "eps": (lambda v: v > 0, "a positive number"),
    "head_dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "head_hidden_dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "initializer_range": (lambda v: v >= 0, "a number >= 0"),
}


def check_numbers(**values) -> None:
    """``ValueError`` for a numeric config field given a value it cannot take."""
    for name, value in values.items():
        ok, what = _NUMBERS[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
            raise ValueError(f"{name} must be {what}, got {value!r}")


class SurgeLLMConfig(PretrainedConfig):
    """Everything that builds a SURGELLM model without its weights.

    Args:
        encoder_config: the encoder's own ``transformers`` config (or its dict):
            the model builds its encoder from it, so a saved model loads
            offline and with nothing initialised at random.
        tasks: task name -> number of classes, in task-id order (or a list
            of (name, count) pairs: how it is saved, since JSON objects lose
            their order).
        class_names: task name -> its class names (optional).
        iwn, gate, prefix: the paper's parts, each switchable for its
            ablations (Instance-Weighted Normalization of the lexical
            features, the surgical gate, the task prefix of the text).
        alpha: the task embedding's weight in Eq.3.
        eps: of IWN and the fusion LayerNorm.
        head_dropout, head_hidden_dropout: the heads' two dropouts (Eq.13-14).
        max_seq_length: tokens per input, the prefix included (not
            ``max_length``, which transformers reserves for generation).
        lexicon: the lexical features' word lists (a ``LexicalFeaturizer``
            or its ``to_dict()``); None: the paper's 16 features.
        initializer_range: the standard deviation of the new layers'
            initial weights.
    """

    model_type = "surgellm"
    sub_configs = {"encoder_config": AutoConfig}
    # Trainer's predictions: the logits alone, whatever the encoder returns
    keys_to_ignore_at_inference = ["hidden_states", "attentions"]

    def __init__(
        self,
        encoder_config: Optional[Union[PretrainedConfig, dict]] = None,
        tasks: Optional[Union[Mapping[str, int], List]] = None,
        class_names: Optional[Mapping[str, List[str]]] = None,
        iwn: bool = True,
        gate: bool = True,
        prefix: bool = True,
        alpha: float = 0.1,
        eps: float = 1e-5,
        head_dropout: float = 0.1,
        head_hidden_dropout: float = 0.05,
        max_seq_length: int = 128,
        lexicon: Optional[Union[LexicalFeaturizer, dict]] = None,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        foreign = kwargs.get("model_type")
        if (foreign is not None and foreign != self.model_type) or "hidden_size" in kwargs:
            # from_pretrained(<an encoder>) hands its config here
            raise ValueError(
                f"this is the configuration of {'a ' + repr(foreign) if foreign else 'another'} "
                f"model, not of a SURGELLM model: from_pretrained loads a saved SURGELLM "
                f"model; build a new one from an encoder with "
                f"SurgeLLMForSequenceClassification.from_encoder(<encoder>, tasks=...)"
            )
        if isinstance(encoder_config, dict):
            values = dict(encoder_config)
            model_type = values.pop("model_type", None)
            if model_type is None:
                raise ValueError("encoder_config must name its model_type")
            encoder_config = AutoConfig.for_model(model_type, **values)
        if tasks is None:  # a default config: one two-class task, no encoder yet
            tasks = {"task": 2}
        if isinstance(tasks, list) and all(
            isinstance(p, (list, tuple)) and len(p) == 2 for p in tasks
        ):
            tasks = _pairs_to_dict(tasks, "tasks")
        if not isinstance(tasks, Mapping) or not tasks:
            raise ValueError(f"tasks must map task name to number of classes, got {tasks!r}")
        tasks = dict(tasks)
        for name, n in tasks.items():
            if not isinstance(name, str) or not _TASK_NAME.fullmatch(name):
                raise ValueError(
                    f"task names must be non-empty strings without white space, "
                    f"'|', '[' or ']', got {name!r}"
                )
            if isinstance(n, bool) or not isinstance(n, int) or n < 2:
                raise ValueError(f"tasks[{name!r}] must be a number of classes >= 2, got {n!r}")
        if class_names is not None:
            class_names = {k: [str(c) for c in v] for k, v in class_names.items()}
            for name, n in tasks.items():
                names = class_names.get(name)
                if names is None or len(names) != n or len(set(names)) != n:
                    raise ValueError(
                        f"class_names[{name!r}] must list {n} distinct names, got {names!r}"
                    )
            unknown = sorted(set(class_names) - set(tasks))
            if unknown:
                raise ValueError(
                    f"class_names names tasks that tasks does not: {unknown} "
                    f"(tasks: {list(tasks)}); give the class names of these tasks only"
                )
        if (
            isinstance(max_seq_length, bool)
            or not isinstance(max_seq_length, int)
            or max_seq_length < 2
        ):
            raise ValueError(f"max_seq_length must be an int >= 2, got {max_seq_length!r}")
        limit = getattr(encoder_config, "max_position_embeddings", None)
        if isinstance(limit, int) and max_seq_length > limit:
            raise ValueError(
                f"max_seq_length={max_seq_length} exceeds the encoder's "
                f"max_position_embeddings={limit}"
            )
        check_numbers(  # here, not when a module first uses them
            alpha=alpha,
            eps=eps,
            head_dropout=head_dropout,
            head_hidden_dropout=head_hidden_dropout,
            initializer_range=initializer_range,
        )
        if isinstance(lexicon, LexicalFeaturizer):
            lexicon = lexicon.to_dict()
        if isinstance(lexicon, Mapping) and isinstance(lexicon.get("groups"), list):
            # as saved, in order
            lexicon = {**lexicon, "groups": _pairs_to_dict(lexicon["groups"], "lexicon groups")}
        if lexicon is not None:
            lexicon = LexicalFeaturizer.from_dict(lexicon).to_dict()  # checked
        self.encoder_config = encoder_config
        self.tasks: Dict[str, int] = tasks
        self.class_names = class_names
        self.iwn, self.gate, self.prefix = bool(iwn), bool(gate), bool(prefix)
        self.alpha, self.eps = alpha, eps
        self.head_dropout, self.head_hidden_dropout = head_dropout, head_hidden_dropout
        self.max_seq_length = max_seq_length
        self.lexicon = lexicon
        self.initializer_range = initializer_range
        # transformers' one label space: the logits' columns (column_names)
        maps = ("num_labels", "id2label", "label2id")
        label_maps = {k: kwargs.pop(k) for k in maps if k in kwargs}
        super().__init__(id2label={0: "LABEL_0"}, **kwargs)  # set by the check
        self.check_label_maps(label_maps)

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        # from_pretrained's keyword arguments for this config's own fields
        # (eps=..., tasks=...) go through __init__ and its checks, where
        # transformers would set them on the built config past them. New
        # tasks or class names bring their own label maps.
        # (encoder_config is a sub-config, which transformers merges itself)
        fields = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
        own = {k: kwargs.pop(k) for k in list(kwargs) if k in fields - {"encoder_config"}}
        if own:
            saved_names = config_dict.get("class_names")
            config_dict = {**config_dict, **own}
            if "tasks" in own or "class_names" in own:
                for k in ("num_labels", "id2label", "label2id"):
                    config_dict.pop(k, None)
            if "tasks" in own and "class_names" not in own and isinstance(saved_names, Mapping):
                # the saved class names of the tasks kept (__init__ checks the rest)
                with contextlib.suppress(TypeError, ValueError):
                    kept = set(dict(own["tasks"]))
                    config_dict["class_names"] = {k: v for k, v in saved_names.items() if k in kept}
        return super().from_dict(config_dict, **kwargs)

    def to_dict(self) -> dict:
        output = super().to_dict()
        # JSON objects lose their order when saved (keys sorted): the tasks'
        # order is the task ids', the word groups' the features'
        output["tasks"] = [[name, n] for name, n in self.tasks.items()]
        if self.lexicon is not None:
            output["lexicon"] = {
                **self.lexicon,
                "groups": list(map(list, self.lexicon["groups"].items())),
            }
        return output

    @property
    def hidden_size(self) -> int:
        """The encoder's (and so the fusion's) width."""
        if self.encoder_config is None:
            raise ValueError("this SurgeLLMConfig has no encoder_config")
        return self.encoder_config.hidden_size

    @property
    def task_names(self) -> List[str]:
        return list(self.tasks)

    @property
    def max_classes(self) -> int:
        return max(self.tasks.values())

    def column_names(self) -> Dict[int, str]:
        """Names of the logits' columns: the one task's class names, or
        transformers' ``LABEL_0``, ``LABEL_1``, ..."""
        if len(self.tasks) == 1 and self.class_names is not None:
            return dict(enumerate(self.class_names[next(iter(self.tasks))]))
        return {i: f"LABEL_{i}" for i in range(self.max_classes)}

    def check_label_maps(self, given: Optional[Mapping] = None) -> None:
        """``num_labels``, ``id2label``, ``label2id`` (``given`` to the
        constructor, or as set on this config since) must describe the
        logits' columns, and ``problem_type`` single-label classification:
        SURGELLM's classes are set per task, and a model would ignore other
        values. Given to the constructor, a map of generic names of another
        length (an older save's default) is taken as that default."""
        names = self.column_names()
        wrong = {}
        if given is not None:  # to the constructor
            for key, value in given.items():
                if value is None:
                    continue
                if key == "num_labels":
                    ok = value == len(names)
                else:
                    id2label = _as_id2label(value, inverse=key == "label2id")
                    ok = id2label is not None and (id2label == names or _generic(id2label))
                if not ok:
                    wrong[key] = value
        else:  # as set since (e.g. from_pretrained(path, num_labels=7))
            id2label = _as_id2label(self.id2label)
            if id2label is not None and _generic(id2label) and len(id2label) != len(names):
                wrong["num_labels"] = len(id2label)
            elif id2label != names:
                wrong["id2label"] = self.id2label
            if _as_id2label(self.label2id, inverse=True) != names:
                wrong["label2id"] = self.label2id
        if self.problem_type not in (None, "single_label_classification"):
            wrong["problem_type"] = self.problem_type
        if wrong:
            what = ", ".join(f"{k}={v!r}" for k, v in wrong.items())
            raise ValueError(
                f"{what}: a SURGELLM model classifies each row into its task's "
                f"classes (tasks={self.tasks}, their names in class_names) with a "
                f"cross-entropy; its logits have {len(names)} columns, named "
                f"{list(names.values())}. Leave num_labels, id2label, label2id and "
                "problem_type out (remove them from a saved config.json); for other "
                "tasks, build a model with "
                "SurgeLLMForSequenceClassification.from_encoder(encoder, tasks)."
            )
        self.id2label = names
        self.label2id = {v: k for k, v in names.items()}

    def save_pretrained(self, save_directory, *args, **kwargs):
        self.check_label_maps()  # no config saved that would not load
        super().save_pretrained(save_directory, *args, **kwargs)

    def check_labels(self, labels, task_ids) -> None:
        """Each label a class of its row's task (tensors of one shape)."""
        import torch

        from ..nn.surgical_gate import check_task_ids

        if labels.shape != task_ids.shape:
            raise ValueError(
                f"labels must have shape {tuple(task_ids.shape)}, got {tuple(labels.shape)}"
            )
        # Each label is checked against its own task's class count: the task
        # ids must index the task list first.
        check_task_ids(task_ids, labels.shape, len(self.tasks))
        counts = torch.tensor(list(self.tasks.values()))[task_ids.cpu()]
        bad = ((labels.cpu() < 0) | (labels.cpu() >= counts)).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise ValueError(
                f"labels[{i}]={int(labels[i])} is not a class of task "
                f"{self.task_names[int(task_ids[i])]!r} (expected "
                f"0 <= label < {int(counts[i])})"
            )

    def featurizer(self) -> LexicalFeaturizer:
        """The lexical featurizer: the paper's 16 features unless ``lexicon``
        gives other word lists."""
        return (
            LexicalFeaturizer()
            if self.lexicon is None
            else LexicalFeaturizer.from_dict(self.lexicon)
        )
