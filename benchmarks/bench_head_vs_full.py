"""Online cost of the hybrid split: ``context_head`` against ``full`` at batch 1, 50-event history.

    python -m benchmarks.bench_head_vs_full --run RUN_DIR [--run RUN_DIR2 ...] [--data DATA_DIR] [--requests 500]
        [--json PATH]

Exports the trained run, then measures in one process: each model's compute alone (the
signature run in-process, one intra-op thread) and Predict latency through the model server
on loopback, both at batch 1 with a full ``MAX_HISTORY``-event history. Reports p50/p99 and
the full / head ratios, the fusion (concat, or cross-attention over N states) and the bytes one
user's ``encoded_history`` takes in the online store. Several ``--run``: measured one after the other
in one process, with each head's compute relative to the first run's.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

from benchmarks import emit


def batch1_inputs(data_dir: str, dim: int, seed: int = 0, states: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Raw inputs for each model: a full-length history, a 5-category context, demographics."""
    from tfrs_ctx import schema
    from tfrs_ctx.data import vocab
    from tfrs_ctx.signatures import HeadRow, head_inputs

    rng = np.random.default_rng(seed)
    items = [int(v) for v in vocab.load_vocab(data_dir, schema.VOCAB_ITEM)]
    cats = [int(v) for v in vocab.load_vocab(data_dir, schema.VOCAB_CATEGORY)]
    L, C = schema.MAX_HISTORY, schema.MAX_CATEGORIES
    history = {
        schema.HISTORY_ITEM: rng.choice(items, (1, L)).astype(np.int64),
        schema.HISTORY_ADVERTISER: rng.integers(1, 500, (1, L)).astype(np.int64),
        schema.HISTORY_EVENT_TYPE: np.asarray([[schema.EVENT_TYPES[0].encode()] * L], object),
        schema.HISTORY_TIME_GAP: rng.integers(1, schema.NUM_TIME_GAP_BUCKETS, (1, L)).astype(np.int64),
        schema.HISTORY_LENGTH: np.asarray([L], np.int64),
    }
    context = HeadRow(
        rng.normal(size=dim * max(1, states)).astype(np.float32),
        L,
        rng.choice(cats, C).tolist(),
        [0.9, 0.5, 0.3, 0.2, 0.1],
    )
    head = head_inputs([context], dim, states)
    return {
        schema.MODEL_CONTEXT_HEAD: head,
        schema.MODEL_FULL: {**history, **{k: v for k, v in head.items() if k != schema.ENCODED_HISTORY}},
    }


def stored_bytes(floats: int) -> dict[str, int]:
    """Bytes of one user's ``encoded_history`` in the online store: the float32 payload and the Feast
    ``ValueProto`` (``float_list_val``) the SQLite and Redis online stores serialize."""
    from feast.protos.feast.types.Value_pb2 import FloatList, Value

    proto = Value(float_list_val=FloatList(val=np.zeros(floats, np.float32).tolist()))
    return {
        "stored_floats_per_user": floats,
        "stored_float_bytes_per_user": 4 * floats,
        "stored_value_proto_bytes": proto.ByteSize(),
    }


def bench_run(run: str, data: str | None, requests: int) -> dict:
    """One run's export: head and full compute alone and through the server, stored bytes per user."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    from benchmarks.bench_serving import compare_models, measure_compute
    from tfrs_ctx import export, schema
    from tfrs_ctx.training.run_dir import load_trained

    model, cfg = load_trained(run, data)
    names = (schema.MODEL_CONTEXT_HEAD, schema.MODEL_FULL)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = os.path.join(tmp, "models")  # serving/models.config's base paths are models/<name>
        result = export.export_all(model, cfg.train.data_dir, tmp, version=1)
        states = model.fusion_states
        inputs = batch1_inputs(cfg.train.data_dir, cfg.model.embedding_dim, states=states)
        out: dict = {"embedding_dim": cfg.model.embedding_dim, "corpus": int(model.corpus_item_ids.shape[0])}
        out |= {"fusion": export.fusion_info(model)["fusion"], "fusion_states": states}
        out |= stored_bytes(cfg.model.embedding_dim * max(1, states))
        for name in names:
            request = predict_pb2.PredictRequest()
            for key, value in inputs[name].items():
                request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
            out[f"compute_{name}"] = measure_compute(result["paths"][name], request, requests)
        served = compare_models(tmp, names, requests=requests, inputs=inputs)
        out.update({f"predict_{n}": served[n] for n in names})
    for kind in ("compute", "predict"):
        head, full = out[f"{kind}_{names[0]}"], out[f"{kind}_{names[1]}"]
        out[f"{kind}_full_over_head_p50"] = round(full["p50_ms"] / head["p50_ms"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, action="append", help="a run directory; repeat to compare runs")
    parser.add_argument("--data")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    results = [bench_run(run, args.data, args.requests) for run in args.run]
    if len(results) == 1:
        emit(results[0], args.json)
        return 0
    first = results[0]["compute_context_head"]["p50_ms"]  # e.g. concat first, then cross_attention
    out = {
        "runs": dict(zip(args.run, results, strict=True)),
        "head_compute_p50_over_first_run": [round(r["compute_context_head"]["p50_ms"] / first, 2) for r in results],
    }
    emit(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
