"""Hybrid export: ``encoder``, ``context_head`` and ``full`` SavedModels of one model version.

``tfrs-ctx export --run RUN_DIR --out models/ [--version V] [--top-k 100]``

Layout is TF Serving's: ``models/<name>/<integer version>/``. Each export is written under a
temporary name (``models/<name>/.tmp-<version>``) and renamed to its version, so a server
polling the base path never sees a half-written model.

Signatures (``serving_default``; batch dimension first; core TensorFlow ops only, so a stock
``tensorflow_model_server`` can serve them; their input specs are :mod:`tfrs_ctx.signatures`).
Inputs are *raw* values: vocabularies are looked up inside the graph, so no client needs them.

* ``encoder``: history (raw ad ids, raw advertiser ids, event-type strings, time-gap
  buckets, left-padded) + ``history_length`` -> ``encoded_history`` ``[B, d]``,
  ``model_version`` ``[B]``.
* ``context_head``: ``encoded_history``, ``history_length``, context (raw category ids +
  confidences), demographics (raw strings; "" = missing) -> ``user_embedding``,
  ``top_k_ids`` (raw ad ids), ``top_k_scores``, ``model_version``.
* ``full``: the encoder's and the head's inputs, minus ``encoded_history`` -> the head's
  outputs (the reference, and the latency baseline).

``model_version`` is the integer version directory, the same for all three; the offline
job stores it next to the vector so the online client never mixes versions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np
import tensorflow as tf

from tfrs_ctx import schema, signatures
from tfrs_ctx.data import vocab
from tfrs_ctx.models.two_tower import ContextualTwoTower
from tfrs_ctx.signatures import Input

MODEL_NAMES = (schema.MODEL_ENCODER, schema.MODEL_CONTEXT_HEAD, schema.MODEL_FULL)
WARMUP_FILE = "tf_serving_warmup_requests"
INFO_FILE = schema.MODEL_INFO_FILE


def tensor_specs(inputs: dict[str, Input]) -> dict[str, tf.TensorSpec]:
    """``tf.TensorSpec`` (batch dimension first) of each signature input."""
    return {
        name: tf.TensorSpec((None, *spec.shape), tf.dtypes.as_dtype(spec.dtype), name=name)
        for name, spec in inputs.items()
    }


class _Lookups(tf.Module):
    """Raw value -> vocab index tables (core HashTable ops), from the training vocabularies."""

    def __init__(self, data_dir: str):
        super().__init__()
        self.tables = {}
        for name in {spec.vocab for spec in signatures.full_inputs_spec().values() if spec.vocab}:
            values = vocab.load_vocab(data_dir, name)
            is_int = name in (schema.VOCAB_ITEM, schema.VOCAB_ADVERTISER, schema.VOCAB_CATEGORY)
            keys = np.asarray([int(v) for v in values], np.int64) if is_int else np.asarray(values, object)
            ids = np.arange(len(values), dtype=np.int64) + schema.NUM_RESERVED_IDS
            if not is_int:  # "" is how a missing string is sent: the padding/missing id
                keys, ids = np.append(keys, schema.MISSING_STRING), np.append(ids, schema.PAD_ID)
            init = tf.lookup.KeyValueTensorInitializer(
                tf.constant(keys, tf.int64 if is_int else tf.string), tf.constant(ids, tf.int64)
            )
            self.tables[name] = tf.lookup.StaticHashTable(init, default_value=schema.OOV_ID)

    def __call__(self, raw: dict[str, tf.Tensor], inputs: dict[str, Input]) -> dict[str, tf.Tensor]:
        out = {}
        for name, spec in inputs.items():
            value = raw[name]
            out[name] = self.tables[spec.vocab].lookup(value) if spec.vocab else value
        if schema.CONTEXT_CATEGORIES in out:  # padding (weight 0) stays padding
            pad = tf.equal(raw[schema.CONTEXT_WEIGHTS], 0.0)
            out[schema.CONTEXT_CATEGORIES] = tf.where(
                pad, tf.zeros_like(out[schema.CONTEXT_CATEGORIES]), out[schema.CONTEXT_CATEGORIES]
            )
        return out


class ExportModule(tf.Module):
    """Holds the trained model, its lookups and the ad-corpus embeddings for the signatures."""

    def __init__(self, model: ContextualTwoTower, data_dir: str, version: int, top_k: int):
        super().__init__()
        self.model = model
        self.lookups = _Lookups(data_dir)
        self.version = tf.constant(version, tf.int64)
        self.top_k = min(top_k, int(model.corpus_item_ids.shape[0]))
        self.corpus_embeddings = tf.Variable(model.corpus_embeddings().numpy(), trainable=False, name="corpus")
        self.corpus_ids = tf.Variable(
            model.corpus_item_ids.numpy().astype(np.int64), trainable=False, name="corpus_ids"
        )

    def _versions(self, batch_of: tf.Tensor) -> tf.Tensor:
        return tf.fill(tf.shape(batch_of)[:1], self.version)

    def encode(self, raw: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        features = self.lookups(raw, signatures.ENCODER_INPUTS)
        encoded = self.model.encode_history(features, training=False)
        return {schema.ENCODED_HISTORY: encoded, schema.MODEL_VERSION: self._versions(encoded)}

    def head(self, raw: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        features = self.lookups(raw, signatures.HEAD_INPUTS)
        user = self.model.head(raw[schema.ENCODED_HISTORY], features, training=False)
        scores, rows = tf.math.top_k(tf.matmul(user, self.corpus_embeddings, transpose_b=True), k=self.top_k)
        return {
            schema.USER_EMBEDDING: user,
            schema.TOP_K_IDS: tf.gather(self.corpus_ids, rows),
            schema.TOP_K_SCORES: scores,
            schema.MODEL_VERSION: self._versions(user),
        }

    def full(self, raw: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        encoded = self.encode(raw)[schema.ENCODED_HISTORY]
        return self.head({**raw, schema.ENCODED_HISTORY: encoded})


def _signature(fn, specs: dict[str, tf.TensorSpec]):
    names = list(specs)

    @tf.function(input_signature=[specs[n] for n in names])
    def serving_default(*args):
        return fn(dict(zip(names, args, strict=True)))

    return serving_default


def _write_warmup(path: str, model_name: str, inputs: dict[str, Input]) -> None:
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name=model_name, signature_name="serving_default")
    )
    for name, value in signatures.example_inputs(inputs).items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
    with tf.io.TFRecordWriter(path) as writer:
        writer.write(log.SerializeToString())


def export_all(
    model: ContextualTwoTower, data_dir: str, out_dir: str, version: int | None = None, top_k: int = 100
) -> dict:
    """Write the three SavedModels atomically; returns ``{name: final path}`` and the version."""
    version = int(version if version is not None else time.time())
    for name in MODEL_NAMES:
        final = os.path.join(out_dir, name, str(version))
        if os.path.exists(final):
            raise FileExistsError(f"{final} exists: model versions are immutable, pick another --version")
    module = ExportModule(model, data_dir, version, top_k)
    dim = model.cfg.embedding_dim
    plans = {
        schema.MODEL_ENCODER: (module.encode, signatures.encoder_inputs_spec()),
        schema.MODEL_CONTEXT_HEAD: (module.head, signatures.head_inputs_spec(dim)),
        schema.MODEL_FULL: (module.full, signatures.full_inputs_spec()),
    }
    info = {
        "model_version": version,
        "schema_version": schema.SCHEMA_VERSION,
        "embedding_dim": dim,
        "top_k": module.top_k,
        "use_context": model.context_layer is not None,
        # How the caller computes the history's gap buckets (beam_pipelines.encode_users reads it).
        "time_gap": model.cfg.time_gap,
        "exported_at": int(time.time()),
    }
    paths = {}
    for name, (fn, inputs) in plans.items():
        base = os.path.join(out_dir, name)
        final, tmp = os.path.join(base, str(version)), os.path.join(base, f".tmp-{version}")
        shutil.rmtree(tmp, ignore_errors=True)
        tf.saved_model.save(module, tmp, signatures={"serving_default": _signature(fn, tensor_specs(inputs))})
        extra = os.path.join(tmp, "assets.extra")
        os.makedirs(extra, exist_ok=True)
        _write_warmup(os.path.join(extra, WARMUP_FILE), name, inputs)
        with open(os.path.join(extra, INFO_FILE), "w") as f:
            json.dump({**info, "model_name": name}, f, indent=2)
        os.rename(tmp, final)
        paths[name] = final
    return {"version": version, "paths": paths, "top_k": module.top_k}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tfrs-ctx export", description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="training run directory (its final/ weights)")
    parser.add_argument("--out", required=True, help="models directory (TF Serving layout)")
    parser.add_argument("--data", help="TFRecord directory holding the vocabularies (default: the run's)")
    parser.add_argument("--version", type=int, help="integer model version (default: unix time now)")
    parser.add_argument("--top-k", type=int, default=100)
    args = parser.parse_args(argv)
    from tfrs_ctx.training.run_dir import load_trained

    model, cfg = load_trained(args.run, args.data)
    result = export_all(model, cfg.train.data_dir, args.out, args.version, args.top_k)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
