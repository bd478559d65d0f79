"""Hybrid export: ``encoder``, ``context_head`` and ``full`` SavedModels of one model version.

``tfrs-ctx export --run RUN_DIR --out models/ [--version V] [--top-k 100] [--index auto|exact|ivf]
[--n-partitions P] [--nprobe N | --target-overlap 0.95] [--quantization int8|bf16|none] [--rescore R]
[--exact-threshold T]``

Layout is TF Serving's: ``models/<name>/<integer version>/``. Each export is written under a
temporary name (``models/<name>/.tmp-<version>``) and renamed to its version, so a server
polling the base path never sees a half-written model.

Signatures (``serving_default``; batch dimension first; core TensorFlow ops only, so a stock
``tensorflow_model_server`` can serve them; their input specs are :mod:`tfrs_ctx.signatures`).
Inputs are *raw* values: vocabularies are looked up inside the graph, so no client needs them.

* ``encoder``: history (raw ad ids, raw advertiser ids, event-type strings, time-gap
  buckets, left-padded) + ``history_length`` -> ``encoded_history`` ``[B, d]`` (``model.fusion=
  cross_attention``: ``[B, N, d]``, the last N states, rows before the first event zero),
  ``model_version`` ``[B]``.
* ``context_head``: ``encoded_history``, ``history_length``, context (raw category ids +
  confidences), demographics (raw strings; "" = missing), optional ``k`` -> ``user_embedding``,
  ``top_k_ids`` (raw ad ids), ``top_k_scores``, ``model_version``.
* ``full``: the encoder's and the head's inputs, minus ``encoded_history`` -> the head's
  outputs (the reference, and the latency baseline).
* a model with ``model.subject_embedding`` (``model_info.json`` ``subject_embedding``): ``context_head``
  and ``full`` also take an optional ``subject_ad_id`` (``[B]`` or ``[1]``; default
  ``schema.NO_SUBJECT_AD``): the request's subject ad as a raw ad id, looked up in the graph (an
  unknown id: no subject). Other models' signatures are unchanged.
* a model with ``model.search_query`` (``model_info.json`` ``search_query``): ``context_head`` and ``full``
  also take an optional ``context_query`` (``[B]`` or ``[1]`` string; default ""): the search request's
  query as typed, tokenised and hashed in the graph (core ``tf.strings`` ops); "" = no query.

The corpus is searched by one :class:`tfrs_ctx.retrieval.IVFIndex` (brute force up to the
exact threshold, IVF above), built here and saved into ``context_head`` and ``full`` only (the
encoder carries no corpus); ``model_info.json`` records its config as ``retrieval``. ``k``
(``[B]``, or ``[1]`` for every row; 1..``top_k``) defaults through ``SignatureDef.defaults`` to
the exported ``top_k``; outputs are ``[B, max(k)]``, padded with (-1, -inf) where fewer ads.

``model_version`` is the integer version directory, the same for all three; the offline
job stores it next to the vector so the online client never mixes versions.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import sys
import time

import numpy as np
import tensorflow as tf

from tfrs_ctx import schema, signatures
from tfrs_ctx.data import vocab
from tfrs_ctx.models.subject import raw_subject_index
from tfrs_ctx.models.two_tower import ContextualTwoTower
from tfrs_ctx.retrieval import IVFIndex
from tfrs_ctx.retrieval.ivf import QUANTIZATIONS, popularity_weights
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

    def __init__(self, data_dir: str, inputs: dict[str, Input]):
        super().__init__()
        self.tables = {}
        for name in sorted({spec.vocab for spec in inputs.values() if spec.vocab}):
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


INDEX_CHOICES = ("auto", "exact", "ivf")
DEFAULT_TARGET_OVERLAP = 0.965  # training-period requests; later (eval) ones reach ~1.5 points less (ivf_report.md)
DEFAULT_HOT_SHARE = 0.0  # IVF: share of the ads (most popular first) every query scores; measured: off (ivf_report.md)
CALIBRATION_QUERIES = 1000


def calibration_queries(model: ContextualTwoTower, data_dir: str, n: int = CALIBRATION_QUERIES) -> np.ndarray:
    """User embeddings ``[<= n, d]`` of the training period's validation requests (the first ``n``
    ``train_requests``, never the eval split), or of training examples when the data has no requests."""
    from tfrs_ctx.data import dataset

    counts = dataset.load_metadata(data_dir).get("counts", {})
    batches = dataset.validation_requests(data_dir, counts, n)
    if not batches:
        batches = list(dataset.make_dataset(data_dir, schema.SPLIT_TRAIN, 1024).unbatch().take(n).batch(1024))
    out = [model.query_embedding(b, training=False).numpy() for b in batches]
    return np.concatenate(out)[:n] if out else np.zeros((0, model.cfg.output_dim), np.float32)


def popularity(model: ContextualTwoTower, data_dir: str) -> np.ndarray | None:
    """Training conversions of each corpus row (``item_counts.tsv``), or ``None`` if the data has none."""
    path = os.path.join(data_dir, schema.ITEM_COUNTS_FILE)
    if not os.path.exists(path):
        return None
    counts = {}
    with open(path) as f:
        for line in f:
            item, _, count = line.rstrip("\n").partition("\t")
            if item:
                counts[int(item)] = int(count)
    return np.asarray([counts.get(int(i), 0) for i in model.corpus_item_ids.numpy()], np.float64)


def primary_ads(model: ContextualTwoTower, data_dir: str, embeddings: np.ndarray, n: int, k: int) -> np.ndarray | None:
    """``[N]`` bool: the ads in the exact top-``k`` of ``n`` training requests after the calibration ones
    (:func:`calibration_queries` never sees them), or ``None`` if the data has none."""
    from tfrs_ctx.data import dataset
    from tfrs_ctx.retrieval.ivf import exact_top_k

    batches = list(dataset.requests_after_validation(data_dir, CALIBRATION_QUERIES).take(n).batch(1024))
    if not batches:
        return None
    queries = np.concatenate([model.query_embedding(b, training=False).numpy() for b in batches])
    mask = np.zeros(len(embeddings), bool)
    mask[exact_top_k(embeddings, queries, k).ravel()] = True
    return mask


def build_index(
    model: ContextualTwoTower, top_k: int, index: str = "auto", data_dir: str | None = None, **params
) -> IVFIndex:
    """The corpus index the head (and ``full``) search: brute force or IVF (:mod:`tfrs_ctx.retrieval.ivf`).

    ``index``: ``"auto"`` (exact up to ``exact_threshold`` ads, default 100,000; IVF above),
    ``"exact"`` or ``"ivf"`` (whatever the size; an empty corpus is always exact). ``params``:
    :func:`tfrs_ctx.retrieval.ivf.build_tables` keywords (``n_partitions``, ``nprobe``,
    ``quantization``, ``rescore``, ``target_overlap``, ...); ``None`` values take the defaults.
    Without an explicit ``nprobe``, an IVF index picks the smallest one that reaches
    ``target_overlap`` (default 0.95; 0 = the size rule) on :func:`calibration_queries` from ``data_dir``;
    its k-means sample is drawn by training popularity (``item_counts.tsv``) unless
    ``popularity_sample=False``, and (with popularity) the ``hot_items`` most popular ads (default
    :data:`DEFAULT_HOT_SHARE` of the corpus; 0 = none) are scored by every query, outside the partitions.
    """
    if index not in INDEX_CHOICES:
        raise ValueError(f"index must be one of {INDEX_CHOICES}, got {index!r}")
    params = {k: v for k, v in params.items() if v is not None}
    embeddings = model.corpus_embeddings_array()
    ids = model.corpus_item_ids.numpy().astype(np.int64)
    if index == "exact":
        params["exact_threshold"] = len(ids)
    elif index == "ivf":
        params["exact_threshold"] = 0
    target = params.pop("target_overlap", DEFAULT_TARGET_OVERLAP)
    is_ivf = len(ids) > params.get("exact_threshold", 100_000)
    if is_ivf and target and not params.get("nprobe") and data_dir is not None:
        params.update(target_overlap=target, calibration_queries=calibration_queries(model, data_dir))
    counts = popularity(model, data_dir) if is_ivf and data_dir is not None else None
    if counts is not None and params.pop("popularity_sample", True):
        params["sample_weights"] = popularity_weights(counts)
        params.setdefault("hot_items", round(DEFAULT_HOT_SHARE * len(ids)))
    else:
        params.pop("hot_items", None)
    params.pop("popularity_sample", None)
    n_primary = params.pop("primary_queries", 0)
    if is_ivf and n_primary and data_dir is not None:
        params["primary"] = primary_ads(model, data_dir, embeddings, n_primary, top_k)
    return IVFIndex.build(embeddings, ids, max_k=top_k, **params)


class _Exported(tf.Module):
    """What one SavedModel tracks: the model, the lookups its inputs need and, for the head and
    ``full``, the corpus index (the encoder's SavedModel holds no corpus)."""

    def __init__(self, model, lookups: _Lookups, version: int, index: IVFIndex | None = None):
        super().__init__()
        self.model, self.lookups, self.version = model, lookups, tf.constant(version, tf.int64)
        if index is not None:
            self.index = index


class ExportModule:
    """The signatures' computations over the trained model, its lookups and the corpus index.

    ``top_k`` is the exported maximum k: outputs are ``[B, max(k)]`` with (-1, -inf) where the
    corpus (or the probed partitions) holds fewer ads than k.
    """

    def __init__(
        self, model: ContextualTwoTower, data_dir: str, version: int, top_k: int, index: IVFIndex | None = None
    ):
        self.model = model
        self.version = version
        self.top_k = int(top_k)
        self.index = index if index is not None else build_index(model, self.top_k)
        self.lookups = {
            schema.MODEL_ENCODER: _Lookups(data_dir, signatures.ENCODER_INPUTS),
            schema.MODEL_CONTEXT_HEAD: _Lookups(data_dir, {**signatures.HEAD_INPUTS, **self._subject_inputs()}),
            schema.MODEL_FULL: _Lookups(data_dir, signatures.full_inputs_spec()),
        }

    def _subject_inputs(self) -> dict[str, Input]:
        """The subject ad's input where the model reads it: the head then carries the ad-id table."""
        if self.model.subject_layer is None:
            return {}
        return {schema.SUBJECT_AD: signatures.OPTIONAL_HEAD_INPUTS[schema.SUBJECT_AD]}

    def _with_subject(self, module: _Exported, raw: dict[str, tf.Tensor], features: dict, batch_of) -> dict:
        """``features`` plus the subject ad's vocab index (raw ``subject_ad_id`` mapped in the graph)
        and, for a search model, the query (``[1]`` broadcast to every row)."""
        if getattr(self.model, "query_layer", None) is not None:
            query = tf.broadcast_to(tf.reshape(raw[schema.CONTEXT_QUERY], [-1]), tf.shape(batch_of)[:1])
            features = {**features, schema.CONTEXT_QUERY: query}
        if self.model.subject_layer is None:
            return features
        table = module.lookups.tables[schema.VOCAB_ITEM]
        return {**features, schema.SUBJECT_ITEM: raw_subject_index(table, raw[schema.SUBJECT_AD], batch_of)}

    def module(self, name: str) -> _Exported:
        """The ``tf.Module`` saved as model ``name`` (only the tables its signature uses)."""
        return _Exported(
            self.model, self.lookups[name], self.version, None if name == schema.MODEL_ENCODER else self.index
        )

    @staticmethod
    def _versions(module: _Exported, batch_of: tf.Tensor) -> tf.Tensor:
        return tf.fill(tf.shape(batch_of)[:1], module.version)

    def encode(self, module: _Exported, raw: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        features = module.lookups(raw, signatures.ENCODER_INPUTS)
        encoded = self.model.encode_history(features, training=False)
        return {schema.ENCODED_HISTORY: encoded, schema.MODEL_VERSION: self._versions(module, encoded)}

    def head(self, module: _Exported, raw: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        features = module.lookups(raw, signatures.HEAD_INPUTS)
        features = self._with_subject(module, raw, features, raw[schema.ENCODED_HISTORY])
        user = self.model.head(raw[schema.ENCODED_HISTORY], features, training=False)
        # k: [B], or [1] for every row (the default); any other length fails in BroadcastTo.
        k = tf.broadcast_to(tf.reshape(raw[schema.REQUEST_K], [-1]), tf.shape(user)[:1])
        found = module.index.search(user, k)
        return {
            schema.USER_EMBEDDING: user,
            schema.TOP_K_IDS: found["top_k_ids"],
            schema.TOP_K_SCORES: found["top_k_scores"],
            schema.MODEL_VERSION: self._versions(module, user),
        }

    def full(self, module: _Exported, raw: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        encoded = self.encode(module, raw)[schema.ENCODED_HISTORY]
        return self.head(module, {**raw, schema.ENCODED_HISTORY: encoded})


def _signature(fn, specs: dict[str, tf.TensorSpec], defaults: dict[str, tf.Tensor] | None = None):
    """``serving_default`` over ``specs``; inputs in ``defaults`` (the last ones) are optional: the
    Python defaults become ``SignatureDef.defaults``, which model servers fill omitted inputs from."""
    names = list(specs)
    defaults = defaults or {}
    if list(defaults) != names[len(names) - len(defaults) :]:
        raise ValueError("inputs with defaults must come last")
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD

    def serving_default(*args):
        return fn(dict(zip(names, args, strict=True)))

    serving_default.__signature__ = inspect.Signature(
        [inspect.Parameter(n, kind, **({"default": defaults[n]} if n in defaults else {})) for n in names]
    )
    return tf.function(serving_default, input_signature=[specs[n] for n in names])


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


def fusion_info(model: ContextualTwoTower) -> dict:
    """``model_info.json``'s fusion keys: the fusion, ``N`` (0 = one ``[d]`` vector) and the store layout."""
    fusion = "cross_attention" if model.fusion_states else "concat"
    return {"fusion": fusion, "fusion_states": model.fusion_states, "store_schema_version": schema.STORE_SCHEMA_VERSION}


def export_all(
    model: ContextualTwoTower,
    data_dir: str,
    out_dir: str,
    version: int | None = None,
    top_k: int = 100,
    index: str = "auto",
    index_params: dict | None = None,
    calibration: dict | None = None,
) -> dict:
    """Write the three SavedModels atomically; returns the version, ``{name: final path}``, the
    exported max k and the index's config (``retrieval``, with its build seconds).

    ``calibration``: the run's ``train_summary.json["calibration"]``; ``model_info.json`` records
    its source, trust and flag (``calibration``; without one: source ``unknown``, flagged).

    ``index`` / ``index_params``: see :func:`build_index`. The corpus index is built once and
    saved into ``context_head`` and ``full`` (the encoder carries no corpus).
    """
    version = int(version if version is not None else time.time())
    for name in MODEL_NAMES:
        final = os.path.join(out_dir, name, str(version))
        if os.path.exists(final):
            raise FileExistsError(f"{final} exists: model versions are immutable, pick another --version")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    built = build_index(model, top_k, index, data_dir, **(index_params or {}))
    exporter = ExportModule(model, data_dir, version, top_k, built)
    dim = model.cfg.embedding_dim
    k_default = {schema.REQUEST_K: tf.constant([top_k], tf.int64)}
    if model.subject_layer is not None:  # only a model that reads the subject ad takes it (default: none)
        k_default[schema.SUBJECT_AD] = tf.constant([schema.NO_SUBJECT_AD], tf.int64)
    if getattr(model, "query_layer", None) is not None:  # a search model: the query (default: none)
        k_default[schema.CONTEXT_QUERY] = tf.constant([""], tf.string)
    plans = {
        schema.MODEL_ENCODER: (exporter.encode, signatures.encoder_inputs_spec(), {}),
        schema.MODEL_CONTEXT_HEAD: (exporter.head, signatures.head_inputs_spec(dim, model.fusion_states), k_default),
        schema.MODEL_FULL: (exporter.full, signatures.full_inputs_spec(), k_default),
    }
    retrieval = {**built.get_config(), "memory_bytes": built.memory_bytes()}
    info = {
        "model_version": version,
        "schema_version": schema.SCHEMA_VERSION,
        "embedding_dim": dim,
        "top_k": top_k,
        "n_items": int(built.n_items),
        "use_context": model.context_layer is not None,
        "subject_embedding": getattr(model, "subject_layer", None) is not None,
        "search_query": getattr(model, "query_layer", None) is not None,
        # How the caller computes the history's gap buckets (beam_pipelines.encode_users reads it).
        "time_gap": model.cfg.time_gap,
        **fusion_info(model),
        "exported_at": int(time.time()),
    }
    if model.context_layer is not None:  # where the served context trust comes from
        c = calibration or {"source": "unknown", "flagged": True, "flag": "uncalibrated"}
        trust = float(model.context_layer.trust.numpy())
        flagged = bool(c.get("flagged", False))  # summaries before the flag: chosen on requests
        info["calibration"] = {"source": c.get("source"), "trust": trust, "flagged": flagged, "flag": c.get("flag")}
        if getattr(model, "query_layer", None) is not None:  # the search surface's own trust
            s = c.get("search") or {"source": "unknown", "flagged": True, "flag": "uncalibrated"}
            info["calibration"]["search"] = {
                "source": s.get("source"),
                "trust": float(model.query_layer.trust.numpy()),
                "flagged": bool(s.get("flagged", False)),
                "flag": s.get("flag"),
            }
    paths = {}
    for name, (fn, inputs, defaults) in plans.items():
        base = os.path.join(out_dir, name)
        final, tmp = os.path.join(base, str(version)), os.path.join(base, f".tmp-{version}")
        shutil.rmtree(tmp, ignore_errors=True)
        module = exporter.module(name)
        specs = tensor_specs({**inputs, **{n: signatures.OPTIONAL_HEAD_INPUTS[n] for n in defaults}})
        bound = _signature(lambda raw, fn=fn, module=module: fn(module, raw), specs, defaults)
        tf.saved_model.save(module, tmp, signatures={"serving_default": bound})
        extra = os.path.join(tmp, "assets.extra")
        os.makedirs(extra, exist_ok=True)
        _write_warmup(os.path.join(extra, WARMUP_FILE), name, inputs)
        model_info = {**info, "model_name": name}
        if name != schema.MODEL_ENCODER:
            model_info["retrieval"] = retrieval
        with open(os.path.join(extra, INFO_FILE), "w") as f:
            json.dump(model_info, f, indent=2)
        os.rename(tmp, final)
        paths[name] = final
    return {"version": version, "paths": paths, "top_k": top_k, "retrieval": retrieval}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tfrs-ctx export", description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="training run directory (its final/ weights)")
    parser.add_argument("--out", required=True, help="models directory (TF Serving layout)")
    parser.add_argument("--data", help="TFRecord directory holding the vocabularies (default: the run's)")
    parser.add_argument("--version", type=int, help="integer model version (default: unix time now)")
    parser.add_argument("--top-k", type=int, default=100, help="the exported maximum k (requests may ask fewer)")
    parser.add_argument(
        "--index", choices=INDEX_CHOICES, default="auto",
        help="corpus index: auto = exact up to --exact-threshold ads, IVF above (default auto)",
    )  # fmt: skip
    parser.add_argument("--exact-threshold", type=int, help="auto: brute force up to this many ads (default 100000)")
    parser.add_argument("--n-partitions", type=int, help="IVF partitions (default 8*sqrt(N), at most 16384)")
    parser.add_argument("--nprobe", type=int, help="IVF partitions probed per query (default P/256, >= 8)")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, help="IVF first-pass copy (default int8)")
    parser.add_argument("--rescore", type=int, help="int8/bf16: re-score rescore*k candidates exactly (default 4)")
    parser.add_argument(
        "--target-overlap", type=float,
        help=f"IVF without --nprobe: the smallest nprobe reaching this overlap@top_k with exact search on "
        f"{CALIBRATION_QUERIES} training-period requests (default {DEFAULT_TARGET_OVERLAP}; 0 = P/256)",
    )  # fmt: skip
    parser.add_argument(
        "--kmeans-sample", choices=("popularity", "uniform"), default="popularity",
        help="IVF: draw the k-means sample by training counts (item_counts.tsv; default) or uniformly",
    )  # fmt: skip
    parser.add_argument(
        "--hot-items", type=int,
        help=f"IVF with popularity: the most popular ads every query scores, outside the partitions "
        f"(default {DEFAULT_HOT_SHARE:.0%} of the corpus; 0 = none)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    from tfrs_ctx.training.run_dir import load_trained, read_summary

    model, cfg = load_trained(args.run, args.data)
    params = {
        "exact_threshold": args.exact_threshold,
        "n_partitions": args.n_partitions,
        "nprobe": args.nprobe,
        "quantization": args.quantization,
        "rescore": args.rescore,
        "target_overlap": args.target_overlap,
        "popularity_sample": args.kmeans_sample == "popularity",
        "hot_items": args.hot_items,
    }
    start = time.perf_counter()
    calibration = read_summary(args.run).get("calibration")
    result = export_all(model, cfg.train.data_dir, args.out, args.version, args.top_k, args.index, params, calibration)
    r = result["retrieval"]
    print(
        f"index: {r['mode']} over {r['n_items']} ads (P={r['n_partitions']}, nprobe={r['nprobe']} "
        f"[{r.get('nprobe_source', '-')}], "
        f"{r['quantization']}), built in {r['build_seconds']:.1f} s, {r['memory_bytes'] / 2**20:.1f} MiB; "
        f"export {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
