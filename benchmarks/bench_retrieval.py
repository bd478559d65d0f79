"""The served corpus index on a trained model: exact vs IVF head, recall, memory, server latency.

``python -m benchmarks.bench_retrieval --ads N [--run RUN] [--json FILE]``

Without ``--run``: synthetic raw tables with N ads (``tfrs_ctx.sources.synthetic``, ``--users``) and
the Beam build (or ``--data``, an existing data directory), then a model trained ``--epochs`` x
``--steps`` steps of ``--batch-size`` with ``--loss`` (default mixed negatives): ``--model product``
(default) has the synthetic config's dims (64-d, what the product exports: the honest cost of exact
search), ``--model tiny`` the tests' 16-d config (a smoke run; exact over 1M 16-d ads costs only
~7 ms, so it understates what an index saves). 60 x 64 steps leave a near-random model whose
embeddings are no test of an index. The queries are the user embeddings of held-out (eval split)
requests, so overlap and recall are measured on a trained model's towers, not random vectors.
``--run``: an existing run directory (its data directory must hold N ads).

The model is exported twice through ``tfrs_ctx.export.export_all``: ``--index exact`` and
``--index ivf`` (export's defaults, nprobe calibrated to ``--target-overlap``, unless
``--n-partitions`` / ``--nprobe`` / ``--quantization``). Measured: index build seconds; the ``context_head``
SavedModel's batch-1 p50/p99 in process for both (same run); overlap@100 of IVF vs exact and
Recall@100 of both over ``--queries`` eval requests; SavedModel size and load seconds; the
compatible model server's RSS (psutil) serving the IVF export, and Predict p50/p99 through it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

import tfrs_ctx  # noqa: F401  (the Keras setting, before TensorFlow)


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(path) for f in files)


def _percentiles(times: list[float]) -> tuple[float, float]:
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


def sweep(args, exported: dict, head_in: dict, labels: np.ndarray, exact_top: np.ndarray) -> list[dict]:
    """The exported IVF tables (read back from the SavedModel) searched at other nprobe values."""
    import dataclasses

    import tensorflow as tf

    from tfrs_ctx import schema
    from tfrs_ctx.retrieval import IVFIndex, IVFTables

    path = exported["ivf"]["paths"]["context_head"]
    loaded = tf.saved_model.load(path)
    v = {name: getattr(loaded.index, name).numpy() for name in ("embeddings", "ids", "rows", "centroids", "offsets")}
    quant = loaded.index.quantized.numpy() if hasattr(loaded.index, "quantized") else None
    scale = loaded.index.scale.numpy() if hasattr(loaded.index, "scale") else None
    cfg = exported["ivf"]["retrieval"]
    head = loaded.signatures["serving_default"]
    users = []
    for s in range(0, len(labels), 100):
        part = {k: tf.constant(x[s : s + 100]) for k, x in head_in.items()}
        users.append(head(**part, k=tf.constant([1], tf.int64))[schema.USER_EMBEDDING].numpy())
    users = np.concatenate(users)
    out = []
    for nprobe in args.sweep_nprobe:
        tables = IVFTables(
            "ivf", v["embeddings"], v["ids"], v["rows"], v["centroids"], v["offsets"], quant, scale,
            dict(cfg, nprobe=min(nprobe, cfg["n_partitions"])), 0.0,
        )  # fmt: skip
        index = IVFIndex(dataclasses.replace(tables))
        fn = tf.function(lambda q, index=index: index.search(q)["top_k_ids"])
        got = np.concatenate([fn(tf.constant(users[s : s + 50])).numpy() for s in range(0, len(users), 50)])
        times = []
        for i in range(min(args.reps, 200)):
            q = tf.constant(users[i % len(users)][None])
            t0 = time.perf_counter()
            fn(q)
            times.append(time.perf_counter() - t0)
        overlap = np.mean([len(set(got[i]) & set(exact_top[i]) - {-1}) / 100 for i in range(len(got))])
        p50, p99 = _percentiles(times[20:])
        out.append(
            {
                "nprobe": nprobe,
                "overlap_at_100": float(overlap),
                "recall_at_100": float(np.mean([labels[i] in got[i] for i in range(len(got))])),
                "search_p50_ms": p50,
                "search_p99_ms": p99,
            }
        )
        print(f"nprobe {nprobe}: {out[-1]}", flush=True)
    return out


def exact_in_process(args, model, users: np.ndarray, labels: np.ndarray, figures: dict) -> np.ndarray:
    """Exact top-100 ids of the IVF head's user embeddings ``users`` over the float32 corpus (matmul + top_k in one
    ``tf.function``), its batch-1 p50/p99 and Recall@100 into ``figures``: the head's exact search
    without the head's lookups and MLP (so the speedup it gives is a lower bound)."""
    import tensorflow as tf

    corpus = tf.constant(model.corpus_embeddings_array())
    item_ids = model.corpus_item_ids.numpy()

    @tf.function(input_signature=[tf.TensorSpec([None, users.shape[1]], tf.float32)])
    def exact(q: tf.Tensor) -> tf.Tensor:
        return tf.math.top_k(tf.matmul(q, corpus, transpose_b=True), 100).indices

    top = np.concatenate([item_ids[exact(tf.constant(users[s : s + 8])).numpy()] for s in range(0, len(users), 8)])
    for i in range(20):
        exact(tf.constant(users[i % len(users)][None]))
    times = []
    for i in range(args.reps):
        q = tf.constant(users[i % len(users)][None])
        t0 = time.perf_counter()
        exact(q)
        times.append(time.perf_counter() - t0)
    figures["exact_p50_ms"], figures["exact_p99_ms"] = _percentiles(times)
    figures["exact_mode"] = "inprocess: matmul + top_k over the float32 corpus (no head MLP, no export)"
    figures["recall_at_100_exact"] = float(np.mean([labels[i] in top[i] for i in range(len(labels))]))
    return top


TINY = [  # the tests' tiny model (16-d): a fast smoke run, not a measure of the product's index
    "model.embedding_dim=16", "model.ff_dim=32", "model.mlp_hidden=[32]", "model.output_dim=16",
    "model.category_dim=8", "model.context_dim=16",
]  # fmt: skip


def train_model(args, data: str, run: str) -> None:
    """Train ``args.model`` (``product``: the synthetic config's dims, 64-d; ``tiny``: 16-d) on ``data``."""
    from tfrs_ctx.config import load_config
    from tfrs_ctx.training import train

    overrides = [
        *(TINY if args.model == "tiny" else []),
        f"train.batch_size={args.batch_size}", f"train.epochs={args.epochs}", f"train.steps_per_epoch={args.steps}",
        "train.validation_examples=200", f"model.loss={args.loss}",
        "train.calibration_examples=0",  # the context trust search scores the whole corpus: minutes at 1M
    ]  # fmt: skip
    cfg = load_config("synthetic", overrides)
    cfg.train.data_dir = data
    train.train(cfg, run, verbose=0)


def prepare(args, work: str) -> tuple[str, str]:
    """(run dir, data dir): a model trained on synthetic data with ``args.ads`` ads (``args.data``: an
    existing data directory instead of generating one)."""
    from beam_pipelines import build_training_data
    from tfrs_ctx.sources.synthetic import SyntheticConfig, generate

    raw, data, run = (os.path.join(work, n) for n in ("raw", "data", "run"))
    t0 = time.perf_counter()
    if args.data:
        data = args.data
    else:
        generate(raw, SyntheticConfig(users=args.users, items=args.ads, subject_items=2000, seed=7), progress=False)
        build_training_data.run(["--input", raw, "--output", data])
    t1 = time.perf_counter()
    train_model(args, data, run)
    print(f"data: {t1 - t0:.0f} s, train {time.perf_counter() - t1:.0f} s", flush=True)
    return run, data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ads", type=int, default=100_000)
    p.add_argument("--run", help="an existing run directory (else one is trained here)")
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--data", help="an existing data directory with N ads (skips generation and the Beam build)")
    p.add_argument(
        "--model", choices=("product", "tiny"), default="product",
        help="model trained here: product = the synthetic config's dims (64-d); tiny = the tests' 16-d (smoke)",
    )  # fmt: skip
    p.add_argument("--steps", type=int, default=1500, help="training steps (60 steps of 64 left a near-random model)")
    p.add_argument("--epochs", type=int, default=1, help="epochs of --steps steps (validation after each)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--loss", default="mixed", help="model.loss (mixed: in-batch + sampled corpus negatives, logQ-corrected)"
    )
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--reps", type=int, default=300, help="batch-1 calls timed per index")
    p.add_argument("--requests", type=int, default=300, help="Predict calls through the server")
    p.add_argument("--n-partitions", type=int)
    p.add_argument("--nprobe", type=int)
    p.add_argument("--quantization", default=None)
    p.add_argument(
        "--primary-queries", type=int,
        help="IVF: training requests whose exact top-100 ads form the primary partition group (0: none)",
    )  # fmt: skip
    p.add_argument("--rescore", type=int, help="IVF: first-pass candidates kept per result (default: export's)")
    p.add_argument("--hot-items", type=int, help="IVF: most popular ads scored by every query (default: export's)")
    p.add_argument("--target-overlap", type=float, help="export's nprobe calibration target (default: export's)")
    p.add_argument(
        "--sweep-nprobe", type=int, nargs="*", default=[],
        help="also overlap@100 / recall@100 / batch-1 p50 of the exported IVF tables at these nprobe values",
    )  # fmt: skip
    p.add_argument(
        "--exact", choices=("export", "inprocess"), default="export",
        help="exact baseline: an exported exact context_head (default), or inprocess: the IVF head's user "
        "embeddings scored against the float32 corpus by one matmul + top_k (no second export: at 10M ads "
        "an exact export writes and loads another ~5 GB; the head's MLP is left out of its time)",
    )  # fmt: skip
    p.add_argument("--json")
    p.add_argument("--keep", help="keep the work directory here")
    args = p.parse_args(argv)

    import psutil
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from serving.launcher import start_server
    from serving.tensor_codec import to_tensor_proto
    from tfrs_ctx import export, schema, signatures
    from tfrs_ctx.data import dataset
    from tfrs_ctx.evaluation.evaluate import raw_inputs
    from tfrs_ctx.training.run_dir import load_trained

    work = args.keep or tempfile.mkdtemp(prefix="bench_retrieval_")
    os.makedirs(work, exist_ok=True)
    try:
        run, data = (args.run, None) if args.run else prepare(args, work)
        model, cfg = load_trained(run, data)
        data = cfg.train.data_dir
        n_items = int(model.corpus_item_ids.shape[0])
        params = {
            "n_partitions": args.n_partitions,
            "nprobe": args.nprobe,
            "quantization": args.quantization,
            "rescore": args.rescore,
            "primary_queries": args.primary_queries,
            "target_overlap": args.target_overlap,
            "hot_items": args.hot_items,
        }
        exported = {}
        for mode in ("exact", "ivf") if args.exact == "export" else ("ivf",):
            out = os.path.join(work, f"models_{mode}")
            t0 = time.perf_counter()
            result = export.export_all(model, data, out, version=1, top_k=100, index=mode, index_params=params)
            exported[mode] = {**result, "export_seconds": time.perf_counter() - t0, "out": out}
            print(f"{mode}: {json.dumps(result['retrieval'])}", flush=True)

        # held-out requests -> raw signature inputs, encoded history, labels (raw ad ids)
        rows, labels = [], []
        for batch in dataset.make_dataset(data, schema.SPLIT_EVAL, 250):
            batch = {k: v.numpy() for k, v in batch.items()}
            rows.append(raw_inputs(batch, data))
            labels.append(model.corpus_item_ids.numpy()[batch[schema.LABEL_ITEM] - schema.NUM_RESERVED_IDS])
            if sum(len(x) for x in labels) >= args.queries:
                break
        raw = {k: np.concatenate([r[k] for r in rows])[: args.queries] for k in rows[0]}
        labels = np.concatenate(labels)[: args.queries]
        enc_fn = tf.saved_model.load(exported["ivf"]["paths"]["encoder"]).signatures["serving_default"]
        encoded = enc_fn(**{k: tf.constant(raw[k]) for k in signatures.ENCODER_INPUTS})[schema.ENCODED_HISTORY]
        head_in = {k: raw[k] for k in signatures.HEAD_INPUTS} | {schema.ENCODED_HISTORY: encoded.numpy()}
        nq = len(labels)

        from tfrs_ctx.training.run_dir import read_summary

        figures: dict = {"ads": n_items, "queries": nq, "trained_here": not args.run}
        summary = read_summary(run)
        keys = ("steps_per_epoch", "epochs_run", "batch_size", "best_val_recall")
        figures["train"] = {k: summary.get(k) for k in keys}
        top = {}
        for mode, result in exported.items():
            path = result["paths"]["context_head"]
            t0 = time.perf_counter()
            head = tf.saved_model.load(path).signatures["serving_default"]
            figures[f"{mode}_load_seconds"] = time.perf_counter() - t0
            figures[f"{mode}_saved_model_mib"] = _dir_bytes(path) / 2**20
            figures[f"{mode}_build_seconds"] = result["retrieval"]["build_seconds"]
            ids, users = [], []
            for s in range(0, nq, 50):
                part = {k: tf.constant(v[s : s + 50]) for k, v in head_in.items()}
                out = head(**part, k=tf.constant([100], tf.int64))
                ids.append(out[schema.TOP_K_IDS].numpy())
                users.append(out[schema.USER_EMBEDDING].numpy())
            top[mode] = np.concatenate(ids)
            one = [{k: tf.constant(v[i : i + 1]) for k, v in head_in.items()} for i in range(min(nq, args.reps))]
            k1 = tf.constant([100], tf.int64)
            for x in one[:20]:
                head(**x, k=k1)
            times = []
            for i in range(args.reps):
                t0 = time.perf_counter()
                head(**one[i % len(one)], k=k1)
                times.append(time.perf_counter() - t0)
            figures[f"{mode}_p50_ms"], figures[f"{mode}_p99_ms"] = _percentiles(times)
            figures[f"recall_at_100_{mode}"] = float(np.mean([labels[i] in top[mode][i] for i in range(nq)]))
            del head
        if args.exact == "inprocess":
            top["exact"] = exact_in_process(args, model, np.concatenate(users), labels, figures)
        figures["index_p50_ms"], figures["index_p99_ms"] = figures.pop("ivf_p50_ms"), figures.pop("ivf_p99_ms")
        figures["recall_at_100_index"] = figures.pop("recall_at_100_ivf")
        figures["speedup_p50"] = figures["exact_p50_ms"] / figures["index_p50_ms"]
        figures["overlap_at_100"] = float(
            np.mean([len(set(top["ivf"][i]) & set(top["exact"][i]) - {-1}) / 100 for i in range(nq)])
        )
        figures["retrieval"] = exported["ivf"]["retrieval"]
        if args.sweep_nprobe:
            try:
                figures["nprobe_sweep"] = sweep(args, exported, head_in, labels, top["exact"])
            except Exception as e:  # the main figures still get written
                figures["nprobe_sweep_error"] = f"{type(e).__name__}: {e}"

        # the compatible model server on the IVF export (context_head only): RSS and Predict latency
        serve = exported["ivf"]["paths"]["context_head"]
        t0 = time.perf_counter()
        with start_server(
            None,
            config=None,
            server="python",
            extra_args=[f"--model_name={schema.MODEL_CONTEXT_HEAD}", f"--model_base_path={os.path.dirname(serve)}"],
        ) as server:
            server.wait_ready(600)
            figures["server_ready_seconds"] = time.perf_counter() - t0
            import grpc

            channel = grpc.insecure_channel(server.address)
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            times = []
            for i in range(args.requests + 20):
                req = predict_pb2.PredictRequest()
                req.model_spec.name = schema.MODEL_CONTEXT_HEAD
                for name, value in head_in.items():
                    req.inputs[name].CopyFrom(to_tensor_proto(value[i % nq : i % nq + 1]))
                req.inputs[schema.REQUEST_K].CopyFrom(to_tensor_proto(np.asarray([100], np.int64)))
                t0 = time.perf_counter()
                stub.Predict(req, timeout=30)
                if i >= 20:
                    times.append(time.perf_counter() - t0)
            figures["predict_p50_ms"], figures["predict_p99_ms"] = _percentiles(times)
            proc = psutil.Process(server.process.pid)
            rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
            figures["server_rss_gib"] = rss / 2**30
            channel.close()
        print(json.dumps(figures, indent=2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(figures, f, indent=2)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
