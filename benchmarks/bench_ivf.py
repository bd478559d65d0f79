"""IVF index vs brute force on synthetic clustered unit vectors.

``python -m benchmarks.bench_ivf --sizes 100000 1000000 [--out bench_ivf.json]``

Corpus: a mixture of gaussian clusters in ``d`` dims (lognormal cluster sizes), normalised.
Queries: corpus vectors plus noise, normalised. For each N: build seconds, p50/p99 latency of
the batch-1 signature (exact and index, same process), speedup, and overlap of the index's
top-k with the exact top-k over ``--queries`` queries, for a grid of (n_partitions, nprobe,
quantization). nprobe and quantization are trace-time constants, so one built table serves
the whole nprobe / quantization grid (the int8 and bf16 copies are built once).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import time

import numpy as np
import tensorflow as tf

from tfrs_ctx.retrieval.ivf import IVFIndex, build_tables, default_n_partitions

GRID = {  # N -> [(n_partitions or None = default, [nprobe...], [quantization...])]
    100_000: [(1265, [8, 16, 32, 64], ["none", "int8"])],
    1_000_000: [(4000, [16, 32, 64, 128], ["none", "bf16", "int8"]), (1000, [8, 16, 32], ["int8"])],
    10_000_000: [(16384, [32, 64, 128, 256], ["int8"])],
}


def clustered(n: int, d: int, n_clusters: int, spread: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, d)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    weights = rng.lognormal(0.0, 1.0, n_clusters)
    labels = rng.choice(n_clusters, n, p=weights / weights.sum()).astype(np.int32)
    x = np.empty((n, d), np.float32)
    step = 1 << 20
    for s in range(0, n, step):
        block = centers[labels[s : s + step]] + rng.standard_normal((len(labels[s : s + step]), d), np.float32) * (
            spread / np.sqrt(d)
        )
        x[s : s + step] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return x


def latency(fn, queries: np.ndarray, k: int, reps: int) -> dict:
    kk = tf.constant([k], tf.int64)
    for i in range(5):
        fn(queries=tf.constant(queries[i : i + 1]), k=kk)
    times = []
    for i in range(reps):
        q = tf.constant(queries[i % len(queries) : i % len(queries) + 1])
        t = time.perf_counter()
        fn(queries=q, k=kk)["top_k_ids"].numpy()
        times.append((time.perf_counter() - t) * 1e3)
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}


def run_batched(fn, queries: np.ndarray, k: int, batch: int) -> np.ndarray:
    out = []
    for s in range(0, len(queries), batch):
        q = queries[s : s + batch]
        out.append(fn(queries=tf.constant(q), k=tf.fill([len(q)], tf.constant(k, tf.int64)))["top_k_ids"].numpy())
    return np.concatenate(out)


def with_k(index: IVFIndex):
    spec = [tf.TensorSpec([None, index.dim], tf.float32, "queries"), tf.TensorSpec([None], tf.int64, "k")]
    return tf.function(lambda queries, k: index.search(queries, k), input_signature=spec).get_concrete_function()


def bench_size(n: int, args) -> list[dict]:
    rows = []
    t = time.perf_counter()
    x = clustered(n, args.dim, args.clusters or int(min(20_000, max(2_000, n // 100))), args.spread, args.seed)
    ids = np.arange(n, dtype=np.int64) * 7 + 1000
    rng = np.random.default_rng(args.seed + 1)
    src = rng.choice(n, args.queries, replace=False)
    q = x[src] + rng.standard_normal((args.queries, args.dim), np.float32) * (args.query_noise / np.sqrt(args.dim))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    print(f"N={n}: data {time.perf_counter() - t:.1f}s", flush=True)

    exact = IVFIndex(build_tables(x, ids, max_k=args.k, exact_threshold=n))
    exact_fn = with_k(exact)
    t = time.perf_counter()
    truth = run_batched(exact_fn, q, args.k, max(32, min(256, 16_000_000 // n)))
    print(f"  ground truth {time.perf_counter() - t:.1f}s", flush=True)
    exact_lat = latency(exact_fn, q, args.k, args.reps_exact if n >= 5_000_000 else args.reps)
    rows.append({"n": n, "method": "exact", **exact_lat, "overlap": 1.0, "build_s": 0.0})
    print(f"  exact p50 {exact_lat['p50_ms']:.2f} ms p99 {exact_lat['p99_ms']:.2f} ms", flush=True)
    del exact, exact_fn
    big = n >= 5_000_000  # memory: drop the original-order copy once the tables are built

    grid = GRID.get(n, [(None, [8, 16, 32, 64], ["none", "bf16"])])
    if args.partitions:  # command-line grid override
        grid = [(p, args.nprobes, args.quants) for p in args.partitions]
    for n_partitions, nprobes, quants in grid:
        p = n_partitions or default_n_partitions(n)
        t = time.perf_counter()
        tables = build_tables(x, ids, max_k=args.k, n_partitions=p, quantization="none", exact_threshold=0,
                              rescore=args.rescore, seed=args.seed)  # fmt: skip
        base_build = time.perf_counter() - t
        if big:
            del x
            gc.collect()
        quantized = {}
        for quant in quants:
            t = time.perf_counter()
            if quant == "int8":
                scale = (np.abs(tables.embeddings).max(axis=0) / 127.0).astype(np.float32)
                quantized[quant] = (np.clip(np.rint(tables.embeddings / scale), -127, 127).astype(np.int8), scale)
            elif quant == "bf16":
                quantized[quant] = (tf.cast(tf.constant(tables.embeddings), tf.bfloat16).numpy(), None)
            print(f"  P={p}: base build {base_build:.1f}s, {quant} copy {time.perf_counter() - t:.1f}s "
                  f"(largest partition {tables.config['largest_partition']})", flush=True)  # fmt: skip
        for quant in quants:
            qz, scale = quantized.get(quant, (None, None))
            cfg = dict(tables.config, quantization=quant, rescore=args.rescore if quant != "none" else 0)
            index = IVFIndex(dataclasses.replace(tables, quantized=qz, scale=scale, config=cfg))
            for nprobe in nprobes:
                index.nprobe = nprobe
                fn = with_k(index)
                got = run_batched(fn, q, args.k, 32 if n <= 1_000_000 else 4)
                overlap = float(np.mean([len(np.intersect1d(a, b)) / args.k for a, b in zip(got, truth, strict=True)]))
                lat = latency(fn, q, args.k, args.reps)
                row = {"n": n, "method": "ivf", "n_partitions": p, "nprobe": nprobe, "quantization": quant,
                       "rescore": cfg["rescore"], "build_s": round(base_build, 2), **lat, "overlap": overlap,
                       "speedup_p50": exact_lat["p50_ms"] / lat["p50_ms"],
                       "bytes_per_ad": index.memory_bytes() / n}  # fmt: skip
                rows.append(row)
                print(f"  P={p:6d} nprobe={nprobe:4d} {quant:5s} overlap@{args.k}={overlap:.4f} "
                      f"p50={lat['p50_ms']:.3f}ms p99={lat['p99_ms']:.3f}ms speedup={row['speedup_p50']:.1f}x",
                      flush=True)  # fmt: skip
            del index, fn
            gc.collect()
        del tables, quantized
    if big:  # x is gone; the exact baseline was measured before the index builds
        return rows
    exact = IVFIndex(build_tables(x, ids, max_k=args.k, exact_threshold=n))
    again = latency(with_k(exact), q, args.k, args.reps_exact if n >= 5_000_000 else args.reps)
    print(f"  exact again p50 {again['p50_ms']:.2f} ms p99 {again['p99_ms']:.2f} ms", flush=True)
    rows.append({"n": n, "method": "exact_again", **again, "overlap": 1.0, "build_s": 0.0})
    for row in rows:
        if row["method"] == "ivf":
            row["speedup_p50_vs_best_exact"] = min(exact_lat["p50_ms"], again["p50_ms"]) / row["p50_ms"]
    return rows


def batch_study(n: int, args) -> list[dict]:
    """Per-query cost at batch B: brute force, the index (padded batch) and a tf.map_fn fallback."""
    x = clustered(n, args.dim, args.clusters or int(min(20_000, max(2_000, n // 100))), args.spread, args.seed)
    ids = np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(args.seed + 1)
    q = x[rng.choice(n, 512, replace=False)] + rng.standard_normal((512, args.dim), np.float32) * 0.06
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    corpus = tf.Variable(x)
    plain = tf.function(lambda queries: tf.math.top_k(tf.matmul(queries, corpus, transpose_b=True), args.k)[1])
    exact = IVFIndex(build_tables(x, ids, max_k=args.k, exact_threshold=n))
    t = time.perf_counter()
    params = {"nprobe": args.study_nprobe, "quantization": args.study_quantization, "rescore": args.rescore,
              "n_partitions": args.study_partitions or None}  # fmt: skip
    index = IVFIndex(build_tables(x, ids, max_k=args.k, exact_threshold=0, seed=args.seed, **params))
    print(f"N={n} study build {time.perf_counter() - t:.1f}s {index.get_config()}", flush=True)
    spec = [tf.TensorSpec([None, args.dim], tf.float32)]
    fns = {
        "plain top_k(matmul) (today's head)": plain,
        "exact signature": tf.function(lambda queries: exact.search(queries)["top_k_ids"]),
        "ivf padded batch": tf.function(lambda queries: index.search(queries)["top_k_ids"], input_signature=spec),
        "ivf tf.map_fn per row": tf.function(
            lambda queries: tf.map_fn(
                lambda row: index.search(row[None])["top_k_ids"][0], queries, fn_output_signature=tf.int64
            ),
            input_signature=spec,
        ),
    }
    rows = []
    for batch in args.batches:
        for name, fn in fns.items():
            reps = max(3, min(100, 2000 // batch)) if "ivf" in name else max(3, 30 // batch)
            fn(tf.constant(q[:batch]))
            times = []
            for i in range(reps):
                chunk = tf.constant(np.roll(q, -i * batch, axis=0)[:batch])
                t = time.perf_counter()
                fn(chunk).numpy()
                times.append((time.perf_counter() - t) * 1e3)
            p50 = float(np.percentile(times, 50))
            rows.append({"n": n, "study": name, "batch": batch, "p50_ms": p50, "per_query_ms": p50 / batch})
            print(f"  B={batch:3d} {name:36s} p50 {p50:8.3f} ms  per query {p50 / batch:7.3f} ms", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--clusters", type=int, default=0, help="mixture components (default N/100 in [2k, 20k])")
    parser.add_argument("--spread", type=float, default=0.7, help="cluster noise norm relative to the unit centre")
    parser.add_argument("--query-noise", type=float, default=0.5)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--reps-exact", type=int, default=60)
    parser.add_argument("--rescore", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_ivf.json")
    parser.add_argument("--partitions", type=int, nargs="*", help="override the grid: n_partitions values")
    parser.add_argument("--nprobes", type=int, nargs="*", default=[16, 32, 64, 128])
    parser.add_argument("--quants", nargs="*", default=["int8"])
    parser.add_argument("--study", type=int, default=0, help="run only the batch-size study at this N")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--study-nprobe", type=int, default=64)
    parser.add_argument("--study-quantization", default="int8")
    parser.add_argument("--study-partitions", type=int, default=0)
    args = parser.parse_args()
    if args.study:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": batch_study(args.study, args)}, f, indent=1)
        return
    rows = []
    for n in args.sizes:
        rows += bench_size(n, args)
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    print(f"\n{'N':>9} {'method':6} {'P':>6} {'nprobe':>6} {'quant':5} {'overlap':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'speedup':>8} {'build s':>8} {'B/ad':>6}")  # fmt: skip
    for r in rows:
        print(f"{r['n']:>9} {r['method']:6} {r.get('n_partitions', ''):>6} {r.get('nprobe', ''):>6} "
              f"{r.get('quantization', ''):5} {r['overlap']:8.4f} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} "
              f"{r.get('speedup_p50', 1.0):8.1f} {r['build_s']:8.1f} {r.get('bytes_per_ad', 0):6.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
