"""The SURGELLM model as ``transformers`` models.

Per example, with task ``t`` and text ``x`` (paper: SURGELLM, TrustNLP 2026)::

    h  = Encoder(prefix(x))[first token]                     (B, d)
    s  = featurizer(x)                                       (B, F), Eq.4
    s^ = InstanceWeightedNorm(s, t)                          Eq.10-11, fixed per task
    z  = SurgicalGate(h, s^, t)                              Eq.3, 5, 6, 7
    logits = head_t(z)                                       Eq.13-14

:class:`SurgeLLMModel` computes ``z`` (its ``pooler_output``);
:class:`SurgeLLMForSequenceClassification` adds one head per task and the
paper's loss. Both are ``PreTrainedModel``\\ s: ``save_pretrained`` /
``from_pretrained`` (also through ``AutoModel`` /
``AutoModelForSequenceClassification`` once ``surgellm_kernels.surgellm``
is imported), ``Trainer``, ``dtype=``, ``low_cpu_mem_usage`` and device maps
work as for any transformers model. The encoder is a submodule built from
its own config (``config.encoder_config``), so loading a saved model
initialises nothing at random.

**The task prefix (Eq.12).** ``[TASK:<t>|F1:<v1>|...|F16:<v16>]`` is
prepended to the text. :meth:`SurgeLLMForSequenceClassification.from_encoder`
adds one token per task marker (``[TASK:<t>``) and one per field marker
(``|F1:`` ...) to the tokenizer and gives each new token, as its initial
embedding, the mean of the encoder's embeddings of the pieces its own text
splits into (a random row would carry no meaning for the few hundred steps
of a fine-tune). The values and the closing ``]`` go through the encoder's
own tokenizer.
"""

from __future__ import annotations

import os
import warnings
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AddedToken, AutoModel, AutoTokenizer, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling, SequenceClassifierOutput
from transformers.utils import can_return_tuple

from ..nn import InstanceWeightedNorm, SurgicalGate
from ..nn.surgical_gate import check_task_ids
from .configuration_surgellm import SurgeLLMConfig

try:  # transformers >= 5: init functions that leave loaded weights alone
    from transformers import initialization as init
except ImportError:  # pragma: no cover - transformers 4
    from torch.nn import init

__all__ = [
    "SurgeLLMPreTrainedModel",
    "SurgeLLMModel",
    "SurgeLLMForSequenceClassification",
    "TaskHead",
    "UngatedFusion",
    "prefix_tokens",
    "check_encoder_path",
]


def prefix_tokens(config: SurgeLLMConfig) -> list:
    """The tokens the prefix adds to a tokenizer: each task marker, then the
    field markers (16 with the paper's features)."""
    markers = [f"[TASK:{t}" for t in config.task_names]
    markers += [f"|F{j}:" for j in range(1, config.featurizer().num_features + 1)]
    return [AddedToken(m, normalized=False, single_word=False) for m in markers]


class UngatedFusion(nn.Module):
    """The ``gate=False`` ablation: ``z = LayerNorm(h~ + s')``, the surgical
    gate's task embedding and feature projection with no gate (an even,
    unlearned sum in place of Eq.6's per-dimension blend)."""

    def __init__(
        self,
        d_model: int,
        num_features: int,
        num_tasks: int = 1,
        alpha: float = 0.1,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.alpha = alpha
        self.task_embedding = nn.Embedding(num_tasks, d_model)
        self.feature_projection = nn.Linear(num_features, d_model)
        self.norm = nn.LayerNorm(d_model, eps=eps)

    def forward(self, h: Tensor, s: Tensor, task_ids: Tensor) -> Tensor:
        check_task_ids(task_ids, h.shape[:-1], self.task_embedding.num_embeddings)
        h_task = h + self.alpha * self.task_embedding(task_ids)
        return self.norm(h_task + F.relu(self.feature_projection(s)))


class TaskHead(nn.Sequential):
    """Eq.13-14: ``Dropout -> Linear(d, d/2) -> GELU -> Dropout -> Linear(d/2, C)``."""

    def __init__(
        self, d_model: int, num_classes: int, dropout: float = 0.1, hidden_dropout: float = 0.05
    ):
        super().__init__(
            nn.Dropout(dropout),
            nn.Linear(d_model, d_model // 2),
            nn.GELU(),
            nn.Dropout(hidden_dropout),
            nn.Linear(d_model // 2, num_classes),
        )


def _without_pooler(encoder: nn.Module) -> nn.Module:
    """The model reads the first token's hidden state, not the encoder's
    pooler (BERT's tanh layer over it): dropped, so that no parameter is
    left without a gradient (DistributedDataParallel would need
    find_unused_parameters) and saved weights do not depend on it."""
    if isinstance(getattr(encoder, "pooler", None), nn.Module):
        encoder.pooler = None
    return encoder


# cross_entropy's ignore_index that no label takes.
_NO_IGNORE_INDEX = -(2**62)


class SurgeLLMPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading shared by the SURGELLM models."""

    config_class = SurgeLLMConfig
    base_model_prefix = "surgellm"
    supports_gradient_checkpointing = True
    # The loss is a mean per task, not a sum over tokens for Trainer to divide:
    # no num_items_in_batch (under DDP it would scale the loss by the ranks).
    accepts_loss_kwargs = False
    # Attention is the encoder's alone: an implementation asked for
    # (attn_implementation=...) is passed on to it, which accepts or refuses
    # it, as in transformers' composite models.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: SurgeLLMConfig, *args, **kwargs):
        # e.g. config.id2label = ... set on a config after it was built: the
        # heads come from config.tasks, which it would not change
        config.check_label_maps()
        super().__init__(config, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, InstanceWeightedNorm):  # buffers included
            init.zeros_(module.running_mean)
            init.ones_(module.running_std)
            init.zeros_(module.statistics_frozen)
            for p, fill in (
                (module.weight, init.ones_),
                (module.bias, init.zeros_),
                (module.gate_logits, init.zeros_),
            ):
                if p is not None:
                    fill(p)

    def resize_token_embeddings(self, *args, **kwargs) -> nn.Embedding:
        """transformers' resize, whose new size also reaches the encoder's
        config: a saved model's encoder is built from ``encoder_config``."""
        embeddings = super().resize_token_embeddings(*args, **kwargs)
        encoder = self.base_model.encoder
        for config in (self.config.encoder_config, encoder.config):
            config.vocab_size = embeddings.num_embeddings
        return embeddings

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        for module in model.modules():  # the fitted flag, as the loaded buffer says
            if isinstance(module, InstanceWeightedNorm):
                module._set_frozen(bool(module.statistics_frozen))
        return loaded


class SurgeLLMModel(SurgeLLMPreTrainedModel):
    """Encoder, IWN and surgical gate: ``pooler_output`` is the fused ``z``
    (B, d); ``last_hidden_state`` the encoder's."""

    def __init__(self, config: SurgeLLMConfig):
        super().__init__(config)
        d, T = config.hidden_size, len(config.tasks)
        num_features = config.featurizer().num_features
        self.encoder = _without_pooler(AutoModel.from_config(config.encoder_config))
        # The attention the encoder runs, which may not be the one asked for
        # by default (sdpa, where the encoder has none)
        config._attn_implementation_internal = self.encoder.config._attn_implementation
        # The paper's IWN has no learned parameters: fixed statistics per task.
        self.iwn = (
            InstanceWeightedNorm(
                num_features, num_classes=config.max_classes, num_tasks=T, eps=config.eps
            )
            if config.iwn
            else None
        )
        fusion = SurgicalGate if config.gate else UngatedFusion
        self.fusion = fusion(d, num_features, T, alpha=config.alpha, eps=config.eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.encoder.set_input_embeddings(value)

    @can_return_tuple  # return_dict, of the call or the config, as transformers' models
    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        task_ids: Optional[Tensor] = None,
        features: Optional[Tensor] = None,
        token_type_ids: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """``labels`` reach IWN only, which needs them in training until its
        statistics are fitted (:meth:`SurgeLLMForSequenceClassification.fit_statistics`)."""
        if task_ids is None or features is None:
            raise ValueError("task_ids and features are required (SurgeLLMProcessor makes them)")
        task_ids = _int64_ids(task_ids)
        if attention_mask is not None and attention_mask.dim() == 2:
            _assert_first_token_attended(attention_mask)
        encoder_inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            encoder_inputs["token_type_ids"] = token_type_ids
        for flag in ("output_hidden_states", "output_attentions"):  # the model's config's too
            if getattr(self.config, flag, False):
                kwargs.setdefault(flag, True)
        encoded = self.encoder(**encoder_inputs, **kwargs, return_dict=True)
        hidden = encoded.last_hidden_state
        dtype = self.fusion.feature_projection.weight.dtype
        # counts past the dtype's range (65504 words in float16) saturate
        # there: as inf they would make the row's logits NaN
        top = torch.finfo(dtype).max
        s = features.to(dtype).clamp(-top, top)
        if self.iwn is not None:
            s = self.iwn(s, labels=labels, task_ids=task_ids)
        z = self.fusion(hidden[:, 0], s, task_ids)
        output = BaseModelOutputWithPooling(
            last_hidden_state=hidden,
            pooler_output=z,
            hidden_states=encoded.hidden_states,  # output_hidden_states / attentions,
            attentions=encoded.attentions,  # from the call or the encoder's config
        )
        return output


def _int64_ids(task_ids: Optional[Tensor]) -> Optional[Tensor]:
    """int32 task ids (which the surgical gate takes) as the int64 that IWN
    and the loss need."""
    if isinstance(task_ids, Tensor) and task_ids.dtype == torch.int32:
        return task_ids.long()
    return task_ids


def _assert_first_token_attended(attention_mask: Tensor) -> None:
    """The model reads each row's first token: where padding comes first (a
    tokenizer that pads on the left) it would read a pad token. A clear
    error on the CPU; on a GPU an assert on the device (no host sync); none
    while compiling."""
    if torch.compiler.is_compiling():
        return
    first = attention_mask[:, 0] != 0
    message = (
        "attention_mask: a row's first token is padding, and SURGELLM reads the first "
        "token: pad on the right (tokenizer.padding_side = 'right')"
    )
    if first.device.type != "cpu":
        torch._assert_async(first.all(), message)
    elif not bool(first.all()):
        raise ValueError(f"{message} (row {int((~first).nonzero()[0, 0])})")


def _assert_labels_are_classes(logits: Tensor, labels: Tensor) -> None:
    """Where the label check on the host does not run (torch.compile, labels
    on a GPU): an assert in the graph or on the device, with no host sync. A
    label past its task's class count names one of the ``-inf`` columns its
    row's logits are padded with: an infinite loss."""
    width = logits.shape[-1]
    picked = logits.detach().gather(-1, labels.clamp(0, width - 1).unsqueeze(-1)).squeeze(-1)
    torch._assert_async(
        ((labels >= 0) & (labels < width) & (picked != float("-inf"))).all(),
        "labels: a label is not a class of its row's task (0 <= label < that task's class count)",
    )


class SurgeLLMForSequenceClassification(SurgeLLMPreTrainedModel):
    """SURGELLM with one classification head per task.

    ``logits`` (B, max classes): row ``i`` holds its own task's head's
    logits, padded with ``-inf`` past that task's class count (``argmax`` is
    the prediction). ``loss`` (with ``labels``): the sum over the tasks in
    the batch of each task's mean cross-entropy (every task weight 1).
    """

    def __init__(self, config: SurgeLLMConfig):
        super().__init__(config)
        d = config.hidden_size
        self.surgellm = SurgeLLMModel(config)
        # One head per task, in task-id order (a list: task names need not be
        # valid attribute names).
        self.heads = nn.ModuleList(
            TaskHead(d, n, config.head_dropout, config.head_hidden_dropout)
            for n in config.tasks.values()
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.surgellm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.surgellm.set_input_embeddings(value)

    @can_return_tuple  # return_dict, of the call or the config, as transformers' models
    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        task_ids: Optional[Tensor] = None,
        features: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        token_type_ids: Optional[Tensor] = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        task_ids = _int64_ids(task_ids)
        checked = (
            labels is not None
            and task_ids is not None  # else the model below says it is required
            and labels.device.type == "cpu"
            and not torch.compiler.is_compiling()
        )
        if checked:
            self.config.check_labels(labels, task_ids)
        base = self.surgellm(
            input_ids,
            attention_mask,
            task_ids,
            features,
            token_type_ids,
            labels=labels,
            return_dict=True,
            **kwargs,
        )
        z = base.pooler_output
        # Every head on every row, then each row's own: static shapes (no
        # per-task boolean indexing), so torch.compile sees one graph. The
        # heads are small next to the encoder.
        counts = list(self.config.tasks.values())
        width = max(counts)
        per_task = torch.stack(
            [
                F.pad(head(z), (0, width - n), value=float("-inf"))
                for head, n in zip(self.heads, counts)
            ]
        )
        logits = per_task[task_ids, torch.arange(z.shape[0], device=z.device)]
        if labels is not None and not checked:
            _assert_labels_are_classes(logits, labels)
        loss = None if labels is None else self.loss(logits, labels, task_ids)
        output = SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=base.hidden_states, attentions=base.attentions
        )
        return output

    def loss(self, logits: Tensor, labels: Tensor, task_ids: Tensor) -> Tensor:
        """Sum over tasks of each task's mean cross-entropy (every task weight 1)."""
        # No ignore index: a label of -100 (which the label check refuses
        # where it runs) must not drop its row silently where it does not
        # (torch.compile, GPU labels): cross_entropy rejects it there (on a
        # GPU, as a device-side assert).
        per_row = F.cross_entropy(
            logits.float(), labels, reduction="none", ignore_index=_NO_IGNORE_INDEX
        )
        rows_per_task = F.one_hot(task_ids, len(self.config.tasks)).sum(0)
        return (per_row / rows_per_task[task_ids]).sum()

    # -- the IWN statistics -------------------------------------------------------------
    @torch.no_grad()
    def fit_statistics(self, batches: Iterable[Mapping[str, Tensor]]) -> None:
        """Fit the paper's fixed IWN statistics (Eq.10-11) on the training
        split, streamed in one pass: ``batches`` yields dicts with
        ``features``, ``labels`` and ``task_ids`` (what
        :class:`SurgeLLMProcessor` makes)."""
        iwn = self.surgellm.iwn
        if iwn is None:
            raise RuntimeError("this model has no IWN (iwn=False): nothing to fit")
        device = iwn.running_mean.device
        rows_per_task = torch.zeros(len(self.config.tasks), dtype=torch.long)

        def rows():  # partial_fit accumulates in float64 itself
            for i, batch in enumerate(batches):
                missing = [k for k in ("features", "labels", "task_ids") if k not in batch]
                if missing:
                    raise ValueError(
                        f"batches[{i}] has no {', '.join(missing)}: each batch needs "
                        f"features, labels and task_ids (SurgeLLMProcessor with labels)"
                    )
                try:  # a label past its task's classes would add a class to its statistics
                    self.config.check_labels(batch["labels"], batch["task_ids"])
                except ValueError as exc:
                    raise ValueError(f"batches[{i}]: {exc}") from None
                task_ids = batch["task_ids"].to(device)
                yield batch["features"].to(device), batch["labels"].to(device), task_ids
                rows_per_task.add_(torch.bincount(task_ids.cpu(), minlength=len(rows_per_task)))

        iwn.fit_batches(rows())
        absent = [t for t, n in zip(self.config.task_names, rows_per_task.tolist()) if n == 0]
        if absent:
            warnings.warn(
                f"fit_statistics: no rows of task(s) {', '.join(absent)}: their IWN "
                f"statistics stay as they were (mean 0, deviation 1 unless fitted before)",
                RuntimeWarning,
                stacklevel=3,
            )
        # A feature constant within every class of a task's training split has
        # sigma 0, and Eq.11 would divide any other value of it by eps alone
        # (a 1e5 gain) at inference. Such a feature is scaled by 1 instead,
        # as scikit-learn's StandardScaler does.
        constant = iwn.running_std == 0
        if constant.any():
            iwn.running_std[constant] = 1.0
            feature_names = self.config.featurizer().feature_names
            pairs = [
                f"{self.config.task_names[t]}:{feature_names[j]}"
                for t, j in constant.nonzero().tolist()
            ]
            warnings.warn(
                f"fit_statistics: {len(pairs)} (task, feature) pairs have no spread "
                f"within any class of the training data and are scaled by 1 "
                f"instead of 1/eps: {', '.join(pairs)}",
                RuntimeWarning,
                stacklevel=3,
            )  # the caller, past torch.no_grad's wrapper

    # -- a new model on a pretrained encoder --------------------------------------------
    @classmethod
    def from_encoder(
        cls,
        encoder: Union[str, os.PathLike, PreTrainedModel],
        tasks: Mapping[str, Union[int, Sequence[str]]],
        tokenizer=None,
        **options,
    ) -> "SurgeLLMForSequenceClassification":
        """A new SURGELLM model on a pretrained ``transformers`` encoder.

        ``encoder``: a model name or a local directory (loaded with
        ``AutoModel`` / ``AutoTokenizer``), or a loaded encoder with its
        ``tokenizer`` (a model with a task head gives its base model).
        ``tasks``: task name -> its number of classes or its class names.
        ``tokenizer``: the prefix tokens are added to it (in
        place; pass it to :class:`SurgeLLMProcessor`). ``options``:
        :class:`SurgeLLMConfig` fields (``iwn=False``, ``gate=False``,
        ``prefix=False``, ``max_seq_length``, ``lexicon``, ...), and
        ``attn_implementation`` / ``dtype``, how a named encoder is loaded.
        """
        # how to load the encoder, not config fields: its attention and dtype
        loading = {k: options.pop(k) for k in ("attn_implementation", "dtype") if k in options}
        if isinstance(encoder, (str, os.PathLike)):
            name = os.fspath(encoder)
            check_encoder_path(name)
            tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(name)
            encoder = AutoModel.from_pretrained(name, **loading)
        elif loading:
            raise ValueError(
                f"{', '.join(loading)} apply when from_encoder loads the encoder (a name or a "
                f"path); a loaded encoder keeps its own: load it with them"
            )
        elif not isinstance(encoder, PreTrainedModel):
            raise TypeError(
                f"encoder must be a model name, a path or a transformers model, "
                f"got {type(encoder).__name__}"
            )
        if tokenizer is None:
            raise ValueError("tokenizer is required when encoder is a model")
        # A model with a task head (AutoModelForMaskedLM, ...) gives its base
        # model, as AutoModel would load it: the head is not used, and a saved
        # model rebuilds its encoder as AutoModel.from_config does.
        encoder = encoder.base_model
        counts, class_names = {}, {}
        for name, value in dict(tasks).items():
            if isinstance(value, int) and not isinstance(value, bool):
                counts[name] = value
            elif isinstance(value, Sequence) and not isinstance(value, str):
                counts[name], class_names[name] = len(value), [str(v) for v in value]
            else:
                raise ValueError(
                    f"tasks[{name!r}] must be a number of classes or a list of "
                    f"class names, got {value!r}"
                )
        if class_names:  # tasks given by a count get their class indices as names
            class_names = {
                name: class_names.get(name, [str(i) for i in range(n)])
                for name, n in counts.items()
            }
        # with the attention the encoder was set to (a config's default would reset it)
        config = SurgeLLMConfig(
            encoder_config=encoder.config,
            tasks=counts,
            class_names=class_names or None,
            attn_implementation=encoder.config._attn_implementation,
            **options,
        )
        if config.prefix:
            _add_prefix_tokens(encoder, tokenizer, prefix_tokens(config))
        config.encoder_config = encoder.config  # with the vocabulary grown
        model = cls(config)
        model.surgellm.encoder = _without_pooler(encoder)
        # In eval mode, as from_pretrained returns a model (and returned the
        # encoder): not half of it in training mode.
        return model.to(encoder.dtype).eval()


def check_encoder_path(name: str) -> None:
    """A path that does not exist gets its own error, not the hub's."""
    looks_like_path = os.sep in name or name.startswith(".") or name.startswith("~")
    if looks_like_path and not os.path.isdir(os.path.expanduser(name)):
        raise FileNotFoundError(
            f"encoder {name!r}: no such directory (give a local model "
            f"directory, or a model name already in the local cache)"
        )


@torch.no_grad()
def _add_prefix_tokens(encoder: PreTrainedModel, tokenizer, tokens: list) -> None:
    """Add ``tokens`` to ``tokenizer`` and grow the encoder's embeddings. The
    row of each token new to the tokenizer, or new to this encoder (a
    tokenizer another model's ``from_encoder`` grew), is set to the mean of
    the rows of the pieces its text is split into without the added tokens;
    the rows of tokens both already had stay."""
    known = tokenizer.get_vocab()
    rows = encoder.get_input_embeddings().num_embeddings
    # new ids may fall in spare rows an encoder keeps past its vocabulary (as
    # OPT and Qwen2 do): new to the tokenizer counts as new to the encoder
    fresh = [t.content for t in tokens if t.content not in known or known[t.content] >= rows]
    # split before add_tokens: any tokenizer splits a text it has no added
    # token for, and a tokenizer refused here is left as it was
    pieces = _pieces_without(tokenizer, fresh)
    tokenizer.add_tokens(tokens)
    if len(tokenizer) > rows:
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = encoder.get_input_embeddings().weight
    for content, ids in zip(fresh, pieces):
        weight[tokenizer.convert_tokens_to_ids(content)] = weight[ids].mean(0)


def _pieces_without(tokenizer, contents: list) -> list:
    """The ids each of ``contents`` is split into by ``tokenizer`` without
    those added tokens: a tokenizer another model's ``from_encoder`` already
    grew holds them, and would give each its own (new) id."""
    vocab = tokenizer.get_added_vocab()
    if not any(c in vocab for c in contents):
        return [tokenizer(c, add_special_tokens=False)["input_ids"] for c in contents]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            "tokenizer already holds the prefix tokens (from_encoder grew it for another "
            "model) and is not a fast tokenizer, whose pieces could be read without them: "
            "pass a tokenizer fresh from AutoTokenizer.from_pretrained"
        )
    import json

    from tokenizers import Tokenizer

    spec = json.loads(backend.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in contents]
    base = Tokenizer.from_str(json.dumps(spec))
    return [base.encode(c, add_special_tokens=False).ids for c in contents]
