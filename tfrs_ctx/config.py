"""Model and training configuration (YAML files under ``tfrs_ctx/configs/``)."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import yaml

from tfrs_ctx import schema

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")
CONTEXT_SOURCES = ("synthetic", "real", "none")
MODE_PER_TARGET = "per_target"  # one example per target conversion (the `train` split)
MODE_DENSE = "dense"  # one causal pass per window, every position a target (`train_sequences`)
TRAIN_MODES = (MODE_PER_TARGET, MODE_DENSE)
TIME_GAP_AUTO = "auto"
LOSSES = ("auto", "full_softmax", "in_batch", "mixed")  # next_event in dense mode, to_target per target
FUSION_CONCAT, FUSION_CROSS_ATTENTION = "concat", "cross_attention"
FUSIONS = (FUSION_CONCAT, FUSION_CROSS_ATTENTION)
OPTIMIZERS = ("auto", "adam", "lazy_adam", "adagrad")  # tfrs_ctx/training/optimizers.py
log = logging.getLogger(__name__)


@dataclasses.dataclass
class ModelConfig:
    embedding_dim: int = 64  # event / item embeddings and the encoded-history vector
    blocks: int = 2
    heads: int = 2
    ff_dim: int = 128
    dropout: float = 0.1
    causal: bool = True
    category_dim: int = 32  # shared by the context layer and the ad tower
    use_context: bool = True  # False: the sequence-only production baseline
    context_dim: int = 64
    context_dropout: float = 0.0  # the paper's "high dropout on the context layer": see the ablation
    context_drop_prob: float = 0.0  # drop the whole context of an example in training
    no_context_loss_weight: float = 0.3  # the same examples' loss with context cleared (shared encoding)
    demographic_dim: int = 8
    mlp_hidden: list[int] = dataclasses.field(default_factory=lambda: [256])
    output_dim: int = 64
    temperature: float = 0.05
    full_softmax_max_items: int = 200_000  # above (loss=auto): mixed negatives, logQ-corrected
    loss: str = "auto"  # auto (by full_softmax_max_items) | full_softmax | in_batch | mixed (both logQ-corrected)
    sampled_negatives: int = 1024  # mixed: corpus ads sampled per step, shared by every query of the batch
    sampled_popularity_share: float = 0.0  # mixed: share of them drawn by training popularity, the rest uniform
    time_gap: str = TIME_GAP_AUTO  # history gap semantics: to_target | next_event (schema.TIME_GAP_*)
    # How the context meets the history: concat (the context vector next to the last state) | cross_attention
    # (the context vector also attends over the last fusion_states encoded states; the encoder exports [N, d])
    fusion: str = FUSION_CONCAT
    fusion_states: int = 8
    # The subject ad's own id embedding (shared with the towers) in the context path (tfrs_ctx/models/subject.py);
    # trained where the data defines the subject (train.context_is_previous_event; tfrs_ctx/training/subject.py)
    subject_embedding: bool = False
    # The search surface (tfrs_ctx/models/query_encoder.py): the query text, hashed words and char n-grams in the
    # graph, as a second context block with its own trust; one model serves both surfaces (a request brings
    # the subject item's categories, or a query, or neither). Needs data with the taxonomy's names.
    search_query: bool = False
    query_buckets: int = 65_536  # hash buckets of the word table and of the n-gram table each


@dataclasses.dataclass
class TrainConfig:
    data_dir: str = ""
    mode: str = MODE_PER_TARGET  # per_target | dense (every position of a history a target in one pass)
    batch_size: int = 512  # per_target: examples (= targets) per step
    sequence_batch_size: int = 64  # dense: sequence windows per step (each up to MAX_HISTORY targets)
    # dense (tfrs_ctx/training/dense.py): score a target from the last input strictly before its timestamp
    # (as a per-target history); weigh a user's targets to count as at most this many (0: every target 1)
    dense_strict_history: bool = False
    dense_user_targets: int = 0
    # The dense recipe (issue 18; the bundled configs set it): the loss dense mode uses where model.loss is auto
    # ("": auto's), and the share of each step's targets the no-context loss runs on (1: every target)
    dense_loss: str = ""
    dense_no_context_share: float = 1.0
    epochs: int = 8
    learning_rate: float = 2e-3
    warmup_fraction: float = 0.05
    weight_decay: float = 0.0
    optimizer: str = "auto"  # auto (lazy_adam above 200k item rows, else adam) | adam | lazy_adam | adagrad
    context_source: str = "synthetic"  # synthetic | real (request log) | none
    context_noise: float = 0.2  # synthetic context: share of examples given another example's context
    early_stopping_patience: int = 2
    early_stopping_k: int = 100
    validation_examples: int = 3000
    steps_per_epoch: int | None = None
    shuffle_buffer: int = 50_000
    calibration_examples: int = 10_000  # real-context requests the context trust is chosen on; 0: off
    # The data's request context is the user's previous event (MovieLens): with too few logged
    # requests, calibrate on requests derived from the training histories (training/calibrate.py).
    context_is_previous_event: bool = False
    # model.subject_embedding: the share of training targets given their previous event as the subject ad
    # (that event then left out of their history, as in a request); the others have no subject
    subject_share: float = 0.5
    subject_real_context: bool = True  # a subject target's category context: the subject's own (else the label's)
    # model.search_query: the share of training targets whose context is their synthetic query (categories
    # cleared) rather than their synthetic categories (query cleared): each target trains one surface
    search_share: float = 0.5
    exclude_history: bool = False  # evaluation: drop already-converted ads from the ranking
    seed: int = 0


@dataclasses.dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        unknown = set(d) - {"model", "train"}
        if unknown:
            raise ValueError(f"unknown config sections: {sorted(unknown)}")
        model = _build(ModelConfig, d.get("model", {}))
        train = _build(TrainConfig, _retired_train_keys(d.get("train", {})))
        if train.context_source not in CONTEXT_SOURCES:
            raise ValueError(f"train.context_source must be one of {CONTEXT_SOURCES}, got {train.context_source!r}")
        if train.mode not in TRAIN_MODES:
            raise ValueError(f"train.mode must be one of {TRAIN_MODES}, got {train.mode!r}")
        if model.time_gap == TIME_GAP_AUTO:
            model.time_gap = schema.TIME_GAP_NEXT_EVENT if train.mode == MODE_DENSE else schema.TIME_GAP_TO_TARGET
        if train.optimizer not in OPTIMIZERS:
            raise ValueError(f"train.optimizer must be one of {OPTIMIZERS}, got {train.optimizer!r}")
        if train.mode == MODE_DENSE and train.dense_loss and model.loss == "auto":
            model.loss = train.dense_loss
        if train.dense_loss not in ("", *LOSSES) or not 0.0 < train.dense_no_context_share <= 1.0:
            raise ValueError(f"train.dense_loss must be '' or one of {LOSSES}; train.dense_no_context_share in (0, 1]")
        if model.loss not in LOSSES:
            raise ValueError(f"model.loss must be one of {LOSSES}, got {model.loss!r}")
        if model.sampled_negatives < 1 or not 0.0 <= model.sampled_popularity_share <= 1.0:
            raise ValueError("model.sampled_negatives must be >= 1 and model.sampled_popularity_share in [0, 1]")
        _check_fusion(model)
        if model.time_gap not in schema.TIME_GAP_SEMANTICS:
            raise ValueError(f"model.time_gap must be one of {(TIME_GAP_AUTO, *schema.TIME_GAP_SEMANTICS)}")
        if train.mode == MODE_DENSE:
            if model.time_gap != schema.TIME_GAP_NEXT_EVENT:
                raise ValueError(
                    "train.mode=dense needs model.time_gap=next_event (a causal position cannot see its target)"
                )
            if train.dense_user_targets < 0:
                raise ValueError("train.dense_user_targets must be >= 0 (0: every target weighs 1)")
            if train.context_source == "real":
                raise ValueError("train.mode=dense trains on conversions: train.context_source=real needs per_target")
        _check_subject(model, train)
        _check_search(model, train)
        return cls(model, train)


def _check_fusion(model: ModelConfig) -> None:
    if model.fusion not in FUSIONS:
        raise ValueError(f"model.fusion must be one of {FUSIONS}, got {model.fusion!r}")
    if not 1 <= model.fusion_states <= schema.MAX_HISTORY:
        raise ValueError(f"model.fusion_states must be in 1..{schema.MAX_HISTORY}, got {model.fusion_states}")


def _check_subject(model: ModelConfig, train: TrainConfig) -> None:
    """model.subject_embedding needs a contextual model and a training source of subject ads."""
    if not model.subject_embedding or not model.use_context:  # a baseline has no context path: nothing to check
        return
    if not train.context_is_previous_event:
        raise ValueError(
            "model.subject_embedding is trained on the previous event as the subject: it needs "
            "train.context_is_previous_event=true (the data must define a request's subject that way)"
        )
    if not 0.0 < train.subject_share <= 1.0:
        raise ValueError("train.subject_share must be in (0, 1]")
    if train.mode == MODE_DENSE and train.dense_strict_history:
        raise ValueError("model.subject_embedding with train.dense_strict_history is not supported")


def _check_search(model: ModelConfig, train: TrainConfig) -> None:
    """model.search_query trains per target (sequence examples carry no query)."""
    if not model.search_query or not model.use_context:
        return
    if train.mode == MODE_DENSE:
        raise ValueError("model.search_query needs train.mode=per_target (train_sequences carry no query)")
    if not 0.0 < train.search_share < 1.0:
        raise ValueError("train.search_share must be in (0, 1): each surface needs training targets")
    if model.query_buckets < 1:
        raise ValueError("model.query_buckets must be >= 1")


def _retired_train_keys(values: dict[str, Any]) -> dict[str, Any]:
    """Translate the loss-fitted calibration's keys of older run directories, with a warning."""
    values = dict(values)
    if "calibration_steps" in values:
        steps = values.pop("calibration_steps")
        values.pop("calibration_learning_rate", None)
        values.setdefault("calibration_examples", TrainConfig.calibration_examples if steps else 0)
        log.warning(
            "train.calibration_steps is retired: read as train.calibration_examples=%s", values["calibration_examples"]
        )
    return values


def _build(kind: type, values: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown {kind.__name__} keys: {sorted(unknown)}")
    return kind(**values)


def load_config(path: str, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (a path, or a name of a bundled config) and apply ``section.key=value``."""
    if not os.path.exists(path) and os.path.exists(os.path.join(CONFIG_DIR, f"{path}.yaml")):
        path = os.path.join(CONFIG_DIR, f"{path}.yaml")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    for item in overrides or []:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        if not name:
            raise ValueError(f"override must look like section.key=value, got {item!r}")
        raw.setdefault(section, {})[name] = yaml.safe_load(value)
    return Config.from_dict(raw)


def save_config(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
