"""Beam RunInference for the encoder SavedModel: multi-input user dicts in, ``(vector, version)`` out.

The encoder signature takes several named inputs, so the stock TensorFlow handler (one tensor in)
does not fit; :class:`EncoderModelHandler` loads the SavedModel once per worker process and runs
batches of per-user input dicts (``python -m beam_pipelines.encode_users`` uses it).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from tfrs_ctx import schema as S

ENCODER_INPUTS = (*S.HISTORY_FEATURES, S.HISTORY_LENGTH)  # the encoder signature's inputs
XLA_FLAGS = "--tf_xla_auto_jit=2 --tf_xla_cpu_global_jit"  # XLA auto-clustering, CPU included


class _Encoder:
    """A loaded encoder: the SavedModel (kept alive) and its ``serving_default`` signature."""

    def __init__(self, path: str):
        import tensorflow as tf

        try:
            self.saved_model = tf.saved_model.load(path)
            self.signature = self.saved_model.signatures["serving_default"]
        except Exception as e:  # corrupt saved_model.pb, missing or truncated variables, ...
            raise ValueError(f"cannot load the encoder SavedModel at {path}: {type(e).__name__}: {e}") from e
        names = set(self.signature.structured_input_signature[1])
        if names != set(ENCODER_INPUTS):
            raise ValueError(f"{path} is not an encoder: its inputs are {sorted(names)}, want {sorted(ENCODER_INPUTS)}")

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        import tensorflow as tf

        out = self.signature(**{name: tf.constant(value) for name, value in inputs.items()})
        return out[S.ENCODED_HISTORY].numpy(), out[S.MODEL_VERSION].numpy()


def encode_batch(
    encoder: _Encoder, batch: Sequence[Mapping[str, np.ndarray]], size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Stack per-user inputs into one batch (padded to ``size`` rows) and run the encoder.

    Returns ``([B, d] float32, [B] int64)`` for the ``B = len(batch)`` real rows; padding
    rows repeat the first one (rows are independent in the encoder).
    """
    inputs = {name: np.stack([example[name] for example in batch]) for name in ENCODER_INPUTS}
    n = len(batch)
    if size is not None and size > n:
        inputs = {name: np.concatenate([v, np.repeat(v[:1], size - n, axis=0)]) for name, v in inputs.items()}
    encoded, versions = encoder(inputs)
    return encoded[:n], versions[:n]


class EncoderModelHandler(ModelHandler[dict, PredictionResult, _Encoder]):
    """RunInference handler of the encoder SavedModel: dict examples in, ``(vector, version)`` out.

    The signature takes several named inputs, so the stock TensorFlow handler (one tensor
    in) does not fit. The model is loaded once per worker process (RunInference shares it
    between the process's threads); batch sizes are RunInference's.

    ``xla``: run the graph with XLA auto-clustering (``TF_XLA_FLAGS``, set by RunInference
    before the model loads; it takes effect only in a process that has not imported
    TensorFlow yet, e.g. a fresh worker) and pad every batch to ``max_batch_size`` rows, so
    the graph compiles once (about a second) instead of once per batch size.
    """

    def __init__(self, model_path: str, min_batch_size: int = 64, max_batch_size: int = 512, xla: bool = False):
        env = {"TF_XLA_FLAGS": XLA_FLAGS} if xla else {}
        super().__init__(min_batch_size=min_batch_size, max_batch_size=max_batch_size, env_vars=env)
        self.model_path = model_path
        self.pad_to = max_batch_size if xla else None

    def set_environment_vars(self) -> None:
        if self.pad_to and "tensorflow" in sys.modules and XLA_FLAGS not in os.environ.get("TF_XLA_FLAGS", ""):
            logging.warning("--xla: TensorFlow is already loaded in this process, so the encoder runs without XLA")
        super().set_environment_vars()

    def load_model(self) -> _Encoder:
        return _Encoder(self.model_path)

    def run_inference(
        self, batch: Sequence[dict], model: _Encoder, inference_args: dict[str, Any] | None = None
    ) -> Iterable[PredictionResult]:
        encoded, versions = encode_batch(model, batch, self.pad_to)
        return [PredictionResult(example, (encoded[i], int(versions[i]))) for i, example in enumerate(batch)]

    def get_num_bytes(self, batch: Sequence[dict]) -> int:
        return sum(v.nbytes for example in batch for v in example.values())

    def get_metrics_namespace(self) -> str:
        return "EncodeUsers"
