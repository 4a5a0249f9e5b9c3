"""The SURGELLM model (SPEC section 1) on a ``transformers`` encoder.

Per example, with task ``t`` and text ``x``::

    h  = Encoder(prefix(x))[first token]                     (B, d)
    s  = featurizer(x)                                       (B, 16), Eq.4 (or lexicon)
    s^ = InstanceWeightedNorm(s, t)                          Eq.10-11, fixed per task
    z  = SurgicalGate(h, s^, t)                              Eq.3, 5, 6, 7
    logits = head_t(z)                                       Eq.13-14

**How the task prefix (Eq.12) is tokenized.** The prefix
``[TASK:<t>|F1:<v1>|...|F16:<v16>]`` is prepended to the text, followed by
one space. ``from_encoder`` adds to the tokenizer one token per task marker
(``[TASK:<t>``) and one per field marker (``|F1:`` ... ``|F16:``), as
ordinary added tokens matched on the raw text, and resizes the encoder's
input embeddings to match (transformers draws the new rows from a normal
distribution with the old rows' mean and covariance, from torch's random
generator: seed before ``from_encoder``). The values and the closing ``]`` go through the encoder's
own tokenizer. A prefix is thus about 34 tokens instead of about 84 when
split as plain text. Truncation cuts the end of the text, never the prefix:
a ``max_length`` too short to keep the whole prefix and one text token is an
error. ``prefix=False`` prepends nothing and adds no tokens.

``transformers`` and ``safetensors`` are imported only by the functions that
use them, so ``import surgellm_kernels`` stays light.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from typing import Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .features import FEATURE_NAMES, LexicalFeaturizer, task_prefix
from ..nn import InstanceWeightedNorm, SurgicalGate

__all__ = ["SurgeLLMConfig", "SurgeLLMModel", "SurgeLLMOutput", "UngatedFusion", "TaskHead"]

CONFIG_NAME = "surgellm_config.json"
WEIGHTS_NAME = "model.safetensors"
NUM_FEATURES = len(FEATURE_NAMES)
# A task name appears inside the prefix's brackets: it may not contain them,
# the field separator or white space.
_TASK_NAME = re.compile(r"[^\s|\[\]]+")


@dataclasses.dataclass
class SurgeLLMConfig:
    """Everything needed to rebuild a :class:`SurgeLLMModel` without its weights.

    ``tasks`` maps task name to number of classes, in task-id order;
    ``class_names`` optionally names each task's classes. ``iwn``, ``gate``
    and ``prefix`` switch the paper's components (for its ablations).
    ``encoder_config`` is the encoder's ``transformers`` config as a dict
    (after the prefix tokens were added), so ``from_pretrained`` rebuilds it
    offline.
    """

    tasks: Dict[str, int]
    hidden_size: int
    class_names: Optional[Dict[str, List[str]]] = None
    iwn: bool = True
    gate: bool = True
    prefix: bool = True
    alpha: float = 0.1
    eps: float = 1e-5
    head_dropout: float = 0.1
    head_hidden_dropout: float = 0.05
    max_length: int = 128
    encoder_name: Optional[str] = None
    encoder_config: Optional[dict] = None
    lexicon: Optional[dict] = None

    def __post_init__(self):
        if isinstance(self.lexicon, LexicalFeaturizer):
            self.lexicon = self.lexicon.to_dict()
        if self.lexicon is not None:
            self.lexicon = LexicalFeaturizer.from_dict(self.lexicon).to_dict()  # checked
        if not isinstance(self.tasks, Mapping) or not self.tasks:
            raise ValueError(f"tasks must map task name to number of classes, got {self.tasks!r}")
        self.tasks = dict(self.tasks)
        for name, n in self.tasks.items():
            if not isinstance(name, str) or not _TASK_NAME.fullmatch(name):
                raise ValueError(f"task names must be non-empty strings without white space, "
                                 f"'|', '[' or ']', got {name!r}")
            if isinstance(n, bool) or not isinstance(n, int) or n < 2:
                raise ValueError(f"tasks[{name!r}] must be a number of classes >= 2, got {n!r}")
        if self.class_names is not None:
            self.class_names = {k: list(v) for k, v in self.class_names.items()}
            for name, n in self.tasks.items():
                names = self.class_names.get(name)
                if names is None or len(names) != n or len(set(names)) != n:
                    raise ValueError(f"class_names[{name!r}] must list {n} distinct names, "
                                     f"got {names!r}")
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"max_length must be an int >= 2, got {self.max_length!r}")

    @property
    def task_names(self) -> List[str]:
        return list(self.tasks)

    @property
    def max_classes(self) -> int:
        return max(self.tasks.values())

    def featurizer(self) -> LexicalFeaturizer:
        """The lexical featurizer: the paper's 16 features unless ``lexicon``
        (a :class:`LexicalFeaturizer`'s ``to_dict``) gives other word lists."""
        return (LexicalFeaturizer() if self.lexicon is None
                else LexicalFeaturizer.from_dict(self.lexicon))

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        if values["lexicon"] is None:  # the paper's lists: a config older versions read
            del values["lexicon"]
        return values

    @classmethod
    def from_dict(cls, values: Mapping) -> "SurgeLLMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown SurgeLLMConfig fields {unknown}")
        return cls(**values)


def _without_pooler(encoder: nn.Module) -> nn.Module:
    """The model reads the first token's hidden state, not the encoder's
    pooler (BERT's tanh layer over it): dropped, so that no parameter is
    left without a gradient (DistributedDataParallel would need
    find_unused_parameters) and saved weights do not depend on it."""
    if isinstance(getattr(encoder, "pooler", None), nn.Module):
        encoder.pooler = None
    return encoder


class SurgeLLMOutput(NamedTuple):
    """``loss``: sum over tasks of each task's mean cross-entropy (None
    without labels). ``logits``: (B, max classes), row ``i`` holding the
    logits of its own task's head, padded with ``-inf`` past that task's
    class count (so ``argmax`` is the prediction)."""

    loss: Optional[Tensor]
    logits: Tensor


class UngatedFusion(nn.Module):
    """The ``gate=False`` ablation: ``z = LayerNorm(h~ + s')``, the surgical
    gate's task embedding and feature projection with no gate (an even,
    unlearned sum in place of Eq.6's per-dimension blend)."""

    def __init__(self, d_model: int, num_features: int = NUM_FEATURES, num_tasks: int = 1,
                 alpha: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.alpha = alpha
        self.task_embedding = nn.Embedding(num_tasks, d_model)
        self.feature_projection = nn.Linear(num_features, d_model)
        self.norm = nn.LayerNorm(d_model, eps=eps)

    def forward(self, h: Tensor, s: Tensor, task_ids: Tensor) -> Tensor:
        h_task = h + self.alpha * self.task_embedding(task_ids)
        return self.norm(h_task + F.relu(self.feature_projection(s)))


class TaskHead(nn.Sequential):
    """Eq.13-14: ``Dropout -> Linear(d, d/2) -> GELU -> Dropout -> Linear(d/2, C)``."""

    def __init__(self, d_model: int, num_classes: int, dropout: float = 0.1,
                 hidden_dropout: float = 0.05):
        super().__init__(nn.Dropout(dropout), nn.Linear(d_model, d_model // 2), nn.GELU(),
                         nn.Dropout(hidden_dropout), nn.Linear(d_model // 2, num_classes))


class SurgeLLMModel(nn.Module):
    """SURGELLM: a shared encoder conditioned on lexical features through the
    surgical gate, with class-balanced (IWN) feature statistics and one head
    per task.

    Build it with :meth:`from_encoder` (a ``transformers`` encoder) or
    :meth:`from_pretrained` (a directory written by :meth:`save_pretrained`).
    Turn texts into model inputs with :meth:`prepare`; fit the IWN statistics
    on the training split with :meth:`fit_statistics` before training.
    """

    def __init__(self, config: SurgeLLMConfig, encoder: nn.Module, tokenizer=None):
        super().__init__()
        self.config = config
        self.encoder = _without_pooler(encoder)
        if tokenizer is not None:
            # the first token is the pooled one, and truncation must cut the
            # text's end, never the prefix in front
            tokenizer.padding_side = tokenizer.truncation_side = "right"
        self.tokenizer = tokenizer
        d, T = config.hidden_size, len(config.tasks)
        self.featurizer = config.featurizer()
        num_features = self.featurizer.num_features
        # The paper's IWN has no learned parameters: fixed statistics per task.
        self.iwn = (InstanceWeightedNorm(num_features, num_classes=config.max_classes,
                                         num_tasks=T, eps=config.eps)
                    if config.iwn else None)
        fusion = SurgicalGate if config.gate else UngatedFusion
        self.fusion = fusion(d, num_features, T, alpha=config.alpha, eps=config.eps)
        # One head per task, in task-id order (a list: task names need not be
        # valid attribute names).
        self.heads = nn.ModuleList(
            TaskHead(d, n, config.head_dropout, config.head_hidden_dropout)
            for n in config.tasks.values())
        self.register_buffer("num_classes", torch.tensor(list(config.tasks.values())),
                             persistent=False)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_encoder(cls, encoder: Union[str, os.PathLike, nn.Module],
                     tasks: Mapping[str, Union[int, Sequence[str]]], tokenizer=None,
                     **options) -> "SurgeLLMModel":
        """A new model on ``encoder``: a ``transformers`` model name or local
        path (loaded with ``AutoModel`` / ``AutoTokenizer``), or a built encoder
        module together with its ``tokenizer``. ``tasks`` maps each task name
        to its number of classes or to its class names. ``options`` are
        :class:`SurgeLLMConfig` fields (``iwn=False``, ``gate=False``,
        ``prefix=False``, ``max_length``, ...)."""
        from transformers import AutoModel, AutoTokenizer

        encoder_name = None
        if isinstance(encoder, (str, os.PathLike)):
            encoder_name = str(encoder)
            tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(
                encoder_name)
            encoder = AutoModel.from_pretrained(encoder_name)
        elif not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be a model name, a path or an nn.Module, "
                            f"got {type(encoder).__name__}")
        if tokenizer is None:
            raise ValueError("tokenizer is required when encoder is a module")
        counts, class_names = {}, {}
        for name, value in dict(tasks).items():
            if isinstance(value, int) and not isinstance(value, bool):
                counts[name] = value
            elif isinstance(value, Sequence) and not isinstance(value, str):
                counts[name], class_names[name] = len(value), [str(v) for v in value]
            else:
                raise ValueError(f"tasks[{name!r}] must be a number of classes or a list of "
                                 f"class names, got {value!r}")
        if class_names:  # tasks given by a count get their class indices as names
            class_names = {name: class_names.get(name, [str(i) for i in range(n)])
                           for name, n in counts.items()}
        encoder_config = getattr(encoder, "config", None)
        if encoder_config is None or not hasattr(encoder_config, "hidden_size"):
            raise ValueError("encoder must be a transformers model (with config.hidden_size)")
        config = SurgeLLMConfig(tasks=counts, hidden_size=encoder_config.hidden_size,
                                class_names=class_names or None, encoder_name=encoder_name,
                                **options)
        limit = getattr(encoder_config, "max_position_embeddings", None)
        if limit is not None and config.max_length > limit:
            raise ValueError(f"max_length={config.max_length} exceeds the encoder's "
                             f"max_position_embeddings={limit}")
        if config.prefix:
            tokenizer.add_tokens(cls.prefix_tokens(config.task_names,
                                                   config.featurizer().num_features))
            # also when the tokenizer had them already (reused, or saved by us)
            if len(tokenizer) > encoder.get_input_embeddings().num_embeddings:
                encoder.resize_token_embeddings(len(tokenizer))
        # as JSON has it (integer keys become strings), so a saved and loaded
        # config compares equal to the original
        config.encoder_config = json.loads(encoder.config.to_json_string(use_diff=False))
        return cls(config, encoder, tokenizer)

    @staticmethod
    def prefix_tokens(task_names: Iterable[str], num_features: int = NUM_FEATURES):
        """The tokens added for the prefix: each task marker and the field
        markers (16 with the paper's features)."""
        from transformers import AddedToken

        markers = [f"[TASK:{t}" for t in task_names]
        markers += [f"|F{j}:" for j in range(1, num_features + 1)]
        return [AddedToken(m, normalized=False, single_word=False) for m in markers]

    # -- inputs -------------------------------------------------------------------------
    def task_ids(self, tasks: Sequence[Union[str, int]]) -> Tensor:
        """Task ids of task names (or ids, checked)."""
        names = self.config.task_names
        ids = []
        for i, t in enumerate(tasks):
            if isinstance(t, str):
                if t not in self.config.tasks:
                    raise ValueError(f"tasks[{i}]: unknown task {t!r}; this model has {names}")
                ids.append(names.index(t))
            elif isinstance(t, int) and 0 <= t < len(names):
                ids.append(t)
            else:
                raise ValueError(f"tasks[{i}] must be a task name or an id in "
                                 f"[0, {len(names)}), got {t!r}")
        return torch.tensor(ids, dtype=torch.long)

    def prepare(self, texts: Sequence[str], tasks: Sequence[Union[str, int]],
                labels: Optional[Sequence[int]] = None,
                device: Optional[Union[str, torch.device]] = None) -> Dict[str, Tensor]:
        """Model inputs for ``texts`` of ``tasks``: the tokenized (prefixed)
        texts, their lexical features (of the full text) and task ids, and
        ``labels`` (class indices within each task) when given."""
        if self.tokenizer is None:
            raise RuntimeError("this model has no tokenizer: pass one to from_encoder")
        if isinstance(texts, str) or len(texts) != len(tasks):
            raise ValueError(f"texts and tasks must be sequences of one length, got "
                             f"{type(texts).__name__} and {len(tasks)} tasks")
        if not texts:
            raise ValueError("texts is empty")
        task_ids = self.task_ids(tasks)
        features = self.featurizer(texts)
        names = self.config.task_names
        if self.config.prefix:
            n = features.shape[1]
            prefixes = [task_prefix(names[t], row, n) for t, row in zip(task_ids.tolist(),
                                                                        features)]
            self._check_prefix_fits(prefixes)
            texts = [f"{p} {t}" for p, t in zip(prefixes, texts)]
        batch = dict(self.tokenizer(list(texts), padding=True, truncation=True,
                                    max_length=self.config.max_length, return_tensors="pt"))
        batch.update(features=features, task_ids=task_ids)
        if labels is not None:
            batch["labels"] = torch.as_tensor(labels, dtype=torch.long)
            self._check_labels(batch["labels"], task_ids)
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        return batch

    def _check_prefix_fits(self, prefixes: List[str]) -> None:
        longest = max(len(ids) for ids in self.tokenizer(prefixes, add_special_tokens=False)[
            "input_ids"])
        needed = longest + self.tokenizer.num_special_tokens_to_add() + 1
        if needed > self.config.max_length:
            raise ValueError(f"max_length={self.config.max_length} cannot hold the task prefix "
                             f"({longest} tokens) and any text: use max_length >= {needed}")

    def _check_labels(self, labels: Tensor, task_ids: Tensor) -> None:
        if labels.shape != task_ids.shape:
            raise ValueError(f"labels must have shape {tuple(task_ids.shape)}, "
                             f"got {tuple(labels.shape)}")
        limit = self.num_classes.to(labels.device)[task_ids.to(labels.device)]
        bad = ((labels < 0) | (labels >= limit)).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            task = self.config.task_names[int(task_ids[i])]
            raise ValueError(f"labels[{i}]={int(labels[i])} is not a class of task {task!r} "
                             f"(expected 0 <= label < {int(limit[i])})")

    # -- the IWN statistics -------------------------------------------------------------
    @torch.no_grad()
    def fit_statistics(self, batches: Iterable[Mapping[str, Tensor]]) -> "SurgeLLMModel":
        """Fit the paper's fixed IWN statistics (Eq.10-11) on the training
        split, streamed: ``batches`` yields dicts with ``features``,
        ``labels`` and ``task_ids`` (e.g. what :meth:`prepare` returns)."""
        if self.iwn is None:
            raise RuntimeError("this model has no IWN (iwn=False): nothing to fit")
        self.iwn.reset_fit()
        device = self.iwn.running_mean.device
        for batch in batches:  # partial_fit accumulates in float64 itself
            self.iwn.partial_fit(batch["features"].to(device), batch["labels"].to(device),
                                 batch["task_ids"].to(device))
        if self.iwn._fit_state is None:
            raise ValueError("fit_statistics: batches yielded no batch")
        self.iwn.fit()
        # A feature constant within every class of a task's training split has
        # sigma 0, and Eq.11 would divide any other value of it by eps alone
        # (a 1e5 gain) at inference. Such a feature is scaled by 1 instead,
        # as scikit-learn's StandardScaler does.
        constant = self.iwn.running_std == 0
        if constant.any():
            self.iwn.running_std[constant] = 1.0
            names = self.config.task_names
            feature_names = self.featurizer.feature_names
            pairs = [f"{names[t]}:{feature_names[j]}" for t, j in constant.nonzero().tolist()]
            warnings.warn(f"fit_statistics: {len(pairs)} (task, feature) pairs have no spread "
                          f"within any class of the training data and are scaled by 1 "
                          f"instead of 1/eps: {', '.join(pairs)}", RuntimeWarning,
                          stacklevel=3)  # the caller, past torch.no_grad's wrapper
        return self

    # -- forward ------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, features: Tensor, task_ids: Tensor,
                attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None,
                labels: Optional[Tensor] = None) -> SurgeLLMOutput:
        if (labels is not None and labels.device.type == "cpu"
                and not torch.compiler.is_compiling()):
            self._check_labels(labels, task_ids)
        encoder_inputs = {"input_ids": input_ids}
        if attention_mask is not None:
            encoder_inputs["attention_mask"] = attention_mask
        if token_type_ids is not None:
            encoder_inputs["token_type_ids"] = token_type_ids
        h = self.encoder(**encoder_inputs).last_hidden_state[:, 0]
        s = features.to(self.fusion.feature_projection.weight.dtype)
        if self.iwn is not None:
            s = self.iwn(s, labels=labels, task_ids=task_ids)
        z = self.fusion(h, s, task_ids)
        # Every head on every row, then each row's own: static shapes (no
        # per-task boolean indexing), so torch.compile sees one graph. The
        # heads are small next to the encoder.
        width = self.config.max_classes
        per_task = torch.stack([F.pad(head(z), (0, width - n), value=float("-inf"))
                                for head, n in zip(self.heads,
                                                   self.config.tasks.values())])
        logits = per_task[task_ids, torch.arange(z.shape[0], device=z.device)]
        loss = None
        if labels is not None:
            loss = self.loss(logits, labels, task_ids)
        return SurgeLLMOutput(loss, logits)

    def loss(self, logits: Tensor, labels: Tensor, task_ids: Tensor) -> Tensor:
        """Sum over tasks of each task's mean cross-entropy (every task weight 1)."""
        per_row = F.cross_entropy(logits.float(), labels, reduction="none")
        rows_per_task = F.one_hot(task_ids, len(self.config.tasks)).sum(0)
        return (per_row / rows_per_task[task_ids]).sum()

    @torch.no_grad()
    def predict(self, texts: Sequence[str], tasks: Sequence[Union[str, int]]) -> List:
        """Predicted class of each text (its name when the config has class names)."""
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            batch = self.prepare(texts, tasks, device=device)
            predictions = self(**batch).logits.argmax(-1).tolist()
        finally:
            self.train(was_training)
        names = self.config.class_names
        if names is None:
            return predictions
        task_names = self.config.task_names
        return [names[task_names[t]][p] for t, p in zip(batch["task_ids"].tolist(), predictions)]

    # -- saving -------------------------------------------------------------------------
    def save_pretrained(self, directory: Union[str, os.PathLike]) -> None:
        """Write the config (JSON), the weights (safetensors) and the tokenizer."""
        from safetensors.torch import save_model

        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            json.dump(self.config.to_dict(), f, indent=2)
        # save_model drops the duplicates of tied weights that save_file refuses.
        save_model(self, os.path.join(directory, WEIGHTS_NAME))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike],
                        device: Optional[Union[str, torch.device]] = None) -> "SurgeLLMModel":
        """Load a model written by :meth:`save_pretrained` (no pickle, no network)."""
        from safetensors.torch import load_model
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory} holds no {CONFIG_NAME}: not a saved "
                                    f"SurgeLLMModel")
        with open(path) as f:
            config = SurgeLLMConfig.from_dict(json.load(f))
        encoder_config = dict(config.encoder_config or {})
        model_type = encoder_config.pop("model_type", None)
        if model_type is None:
            raise ValueError(f"{path}: encoder_config has no model_type")
        encoder = AutoModel.from_config(AutoConfig.for_model(model_type, **encoder_config))
        has_tokenizer = os.path.isfile(os.path.join(directory, "tokenizer_config.json"))
        tokenizer = AutoTokenizer.from_pretrained(directory) if has_tokenizer else None
        model = cls(config, encoder, tokenizer)
        load_model(model, os.path.join(directory, WEIGHTS_NAME), strict=True,
                   device=str(device) if device is not None else "cpu")
        return model if device is None else model.to(device)
