"""Inverted-file (IVF) approximate top-K retrieval written in core TensorFlow ops only.

Build (numpy + TF eager, at export time): spherical k-means centroids trained on a seeded
sample, every ad assigned to its best centroid in chunks, the ad table sorted by partition with
``offsets[P + 1]`` (no padding to the largest partition), plus an optional quantized copy of
the table (``int8`` with a per-dimension scale, or ``bf16``) for the first scoring pass.

Query (graph mode, batch dimension first, any ``B >= 0``): centroid scores -> ``nprobe`` best
partitions per query -> ``tf.ragged.range`` over their ``offsets`` -> candidates padded to the
largest candidate count of the batch -> one batched matmul -> top candidates -> exact float32
re-scoring -> top-k -> raw ad ids. Below ``exact_threshold`` ads the same signature runs brute
force. ``nprobe`` can be calibrated at build time: the smallest that reaches a target overlap with
exact search on sample queries (:func:`calibrate_nprobe`).
Because ``tensorflow_model_server`` has no custom ops, only stock kernels are used.

Result order is total and deterministic: score descending, then corpus row ascending (the
order ``tf.math.top_k`` gives brute force). Final scores are always recomputed by one formula
(``reduce_sum(row * query)`` over the selected rows) so that exact and IVF modes report
bit-identical scores for the same ad. Missing results (fewer ads, or fewer probed candidates,
than ``k``) are padded with id ``-1`` and score ``-inf``.

``k`` per request is a ``[B]`` int64 input (batch-first, so TF Serving's server-side batching
can concatenate requests); the output has ``max(k)`` columns and row ``b`` is padded with
``(-1, -inf)`` beyond ``k[b]``. ``k < 1`` or ``k > max_k`` raises ``InvalidArgumentError``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time

import numpy as np
import tensorflow as tf

QUANTIZATIONS = ("none", "int8", "bf16")
_MIN_KEY = np.iinfo(np.int64).min
_CHUNK = 16384


# --------------------------------------------------------------------------------------- build


def default_n_partitions(n: int) -> int:
    """``8 * sqrt(N)`` partitions, at most 16384 (build time), at least 1 and at most N.

    Measured (REPORT.md): at 1M ads 8 sqrt(N) beats 4 sqrt(N) on both recall and latency.
    """
    return int(max(1, min(n, 16_384, round(8 * math.sqrt(max(n, 1))))))


def popularity_weights(counts: np.ndarray, floor: float = 0.1) -> np.ndarray:
    """k-means sample weights from training counts: ``count + floor`` (never-seen ads stay drawable).

    Measured on a trained 1M-ad model (ivf_report.md): 0.8 % of the ads (>= 5 conversions) make 81 %
    of the exact top-100s; sampling by popularity raised overlap@100 at nprobe 256 of 8000 from 0.777
    to 0.928 for the same number of candidates.
    """
    return np.asarray(counts, np.float64) + floor


def default_nprobe(n_partitions: int) -> int:
    """Partitions probed by default: ``P / 256``, at least 8 (all of them when fewer).

    Measured: 1M ads, P = 8000, nprobe 32 -> overlap@100 0.958; 10M, P = 16384, 64 -> 0.953, on
    synthetic vectors whose queries lie among the ads. A trained model's queries do not (0.26 at 100k):
    pass ``target_overlap`` and sample queries to :func:`build_tables` (export does by default).
    """
    return int(min(n_partitions, max(8, round(n_partitions / 256))))


def _normalize(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0).astype(x.dtype)


def assign(
    x: np.ndarray, centroids: np.ndarray, *, groups: int = 0, neighbours: int = 16, chunk: int = _CHUNK
) -> np.ndarray:
    """Index of the best (largest dot product, lowest index on ties) centroid of each row.

    ``groups > 1``: two-level, ``O(N (G + neighbours * P / G) d)`` instead of ``O(N P d)``: the
    centroids are clustered into ``groups`` coarse groups; a row is compared with the centroids
    of its own ``neighbours`` best groups (dense matmuls, one per group over the rows that
    picked it). A row whose best centroid lies outside those groups gets the best one inside.
    """
    if 1 < groups < len(centroids):
        return _assign_two_level(x, centroids, groups, neighbours, chunk)
    out = np.empty(len(x), np.int32)
    c = tf.constant(centroids, tf.float32)
    for start in range(0, len(x), chunk):
        block = tf.constant(x[start : start + chunk], tf.float32)
        out[start : start + chunk] = tf.argmax(tf.matmul(block, c, transpose_b=True), axis=1, output_type=tf.int32)
    return out


def _assign_two_level(x: np.ndarray, centroids: np.ndarray, groups: int, neighbours: int, chunk: int) -> np.ndarray:
    p = len(centroids)
    coarse = spherical_kmeans(centroids, groups, iters=10, sample_per_cluster=p, max_sample=p, seed=0)
    owner = assign(centroids, coarse, chunk=chunk)
    by_group = np.argsort(owner, kind="stable")  # centroid ids grouped, ascending within a group
    group_bounds = np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=groups))])
    t = min(neighbours, groups)
    top = np.empty((len(x), t), np.int32)  # each row's t best coarse groups
    c = tf.constant(coarse, tf.float32)
    for start in range(0, len(x), chunk):
        scores = tf.matmul(tf.constant(x[start : start + chunk], tf.float32), c, transpose_b=True)
        top[start : start + chunk] = tf.math.top_k(scores, t).indices
    pair_rows = np.repeat(np.arange(len(x), dtype=np.int64), t)
    pair_groups = top.reshape(-1)
    order = np.argsort(pair_groups, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(pair_groups, minlength=groups))])
    best = np.full(len(x), -np.inf, np.float32)
    out = np.full(len(x), p, np.int32)
    for g in range(groups):
        members = by_group[group_bounds[g] : group_bounds[g + 1]]
        rows = pair_rows[order[bounds[g] : bounds[g + 1]]]
        if not len(members) or not len(rows):
            continue
        m = tf.constant(centroids[members], tf.float32)
        for start in range(0, len(rows), chunk):
            r = rows[start : start + chunk]
            scores = tf.matmul(tf.constant(x[r], tf.float32), m, transpose_b=True)
            score = tf.reduce_max(scores, axis=1).numpy()
            idx = members[tf.argmax(scores, axis=1, output_type=tf.int32).numpy()]
            better = (score > best[r]) | ((score == best[r]) & (idx < out[r]))
            best[r[better]], out[r[better]] = score[better], idx[better]
    return out


def spherical_kmeans(
    x: np.ndarray,
    n_clusters: int,
    *,
    iters: int = 10,
    sample_per_cluster: int = 64,
    max_sample: int = 262_144,
    groups: int = 0,
    seed: int = 0,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Unit-norm centroids ``[n_clusters, d]`` trained on a seeded sample of ``x`` (rows normalised)
    of ``min(N, max(n_clusters, min(max_sample, n_clusters * sample_per_cluster)))`` rows.

    Initialisation is a seeded random choice of distinct sample rows; an empty cluster is
    re-seeded with a random sample row. Deterministic for a given input and seed. ``groups``:
    two-level assignment (see :func:`assign`). ``weights [N]`` (> 0): rows are drawn into the sample
    with these relative probabilities (e.g. ad popularity: finer partitions where results are).
    """
    n = len(x)
    rng = np.random.default_rng(seed)
    m = min(n, max(n_clusters, min(max_sample, n_clusters * sample_per_cluster)))
    p = None if weights is None else np.asarray(weights, np.float64) / np.sum(weights)
    sample = _normalize(np.asarray(x[np.sort(rng.choice(n, m, replace=False, p=p))] if m < n else x, np.float32))
    centroids = sample[rng.choice(m, n_clusters, replace=False)].copy()
    for _ in range(iters):
        labels = assign(sample, centroids, groups=groups)
        counts = np.bincount(labels, minlength=n_clusters)
        order = np.argsort(labels, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        sums = np.zeros_like(centroids)
        nonempty = counts > 0
        sums[nonempty] = np.add.reduceat(sample[order], starts[nonempty], axis=0)
        empty = np.flatnonzero(~nonempty)
        if len(empty):
            sums[empty] = sample[rng.choice(m, len(empty), replace=False)]
        centroids = _normalize(sums)
    return centroids


@dataclasses.dataclass
class IVFTables:
    """numpy tables of a built index (``mode`` ``"exact"`` keeps the original row order)."""

    mode: str
    embeddings: np.ndarray  # [N, d] float32, partition-sorted in ivf mode
    ids: np.ndarray  # [N] int64 raw ad ids, same order as embeddings
    rows: np.ndarray  # [N] int32 original corpus row of each table row
    centroids: np.ndarray  # [P, d] float32 (P = 0 in exact mode)
    offsets: np.ndarray  # [P + 1] int32 partition p = table rows offsets[p]:offsets[p + 1]; rows below
    # offsets[0] are the hot tier (searched by every query)
    quantized: np.ndarray | None  # [N, d] int8 or bfloat16 (ml_dtypes) first-pass copy
    scale: np.ndarray | None  # [d] float32 int8 per-dimension scale
    config: dict
    build_seconds: float


def build_tables(
    embeddings: np.ndarray,
    ids: np.ndarray,
    *,
    max_k: int = 100,
    n_partitions: int | None = None,
    nprobe: int | None = None,
    quantization: str = "int8",
    rescore: int = 4,
    exact_threshold: int = 100_000,
    kmeans_iters: int = 10,
    sample_per_partition: int = 64,
    max_sample: int = 262_144,
    two_level_from: int = 8192,
    seed: int = 0,
    target_overlap: float | None = None,
    calibration_queries: np.ndarray | None = None,
    sample_weights: np.ndarray | None = None,
    hot_items: int = 0,
    primary: np.ndarray | None = None,
    rest_partitions: int | None = None,
    nprobe_rest: int | None = None,
) -> IVFTables:
    """Cluster, sort and (optionally) quantize ``embeddings [N, d]`` with raw ``ids [N]``.

    ``rescore``: the first (quantized) pass keeps ``rescore * max(k)`` candidates per query for
    exact float32 re-scoring (ignored when ``quantization == "none"``). Corpora with at most
    ``exact_threshold`` ads get the brute-force mode. From ``two_level_from`` partitions on,
    k-means and the final assignment use the two-level assignment with ``sqrt(P)`` groups.

    ``target_overlap`` with ``calibration_queries [M, d]`` (and no ``nprobe``): ``nprobe`` is the
    smallest that reaches that overlap@max_k on these queries (:func:`calibrate_nprobe`); use
    queries the evaluation does not (e.g. the training requests' user embeddings).
    ``sample_weights [N]`` (> 0): the k-means sample is drawn with these probabilities
    (:func:`spherical_kmeans`); export passes training counts + 0.1 (:func:`popularity_weights`).
    ``hot_items`` (needs ``sample_weights``): that many ads of the largest weight (ties: lower row) form a
    hot tier at the head of the table that every query scores; the partitions (k-means, assignment)
    cover the other ads only. A trained model's results crowd into its popular ads (ivf_report.md).
    ``primary [N]`` (bool): the ads that held a result of some sample queries (export: the exact top-k
    of training requests). They get their own ``n_partitions`` (default ``8 sqrt(N primary)``) and the
    other ads ``rest_partitions`` (default ``sqrt(N rest)``) in a second group; a query probes its
    ``nprobe`` best primary and ``nprobe_rest`` best rest partitions (both calibrated with
    ``target_overlap``). A trained model's queries reach few ads (ivf_report.md, session 8).
    """
    t0 = time.perf_counter()
    x = np.ascontiguousarray(embeddings, np.float32)
    ids = np.asarray(ids, np.int64).reshape(-1)
    if x.ndim != 2 or len(x) != len(ids):
        raise ValueError(f"embeddings must be [N, d] and ids [N]; got {x.shape} and {ids.shape}")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if max_k < 1 or rescore < 1:
        raise ValueError("max_k and rescore must be >= 1")
    n, d = x.shape
    if hot_items and sample_weights is None:
        raise ValueError("hot_items needs sample_weights (the popularity that picks the hot ads)")
    if n >= 2**31:
        raise ValueError("at most 2**31 - 1 ads")
    mode = "exact" if n == 0 or n <= exact_threshold else "ivf"
    config = {
        "mode": mode,
        "n_items": n,
        "dim": d,
        "max_k": int(max_k),
        "exact_threshold": int(exact_threshold),
        "n_partitions": 0,
        "nprobe": 0,
        "quantization": "none",
        "rescore": 0,
        "kmeans_iters": int(kmeans_iters),
        "seed": int(seed),
    }
    if mode == "exact":
        return IVFTables(
            mode, x, ids, np.arange(n, dtype=np.int32), np.zeros((0, d), np.float32), np.zeros(1, np.int32),
            None, None, config, time.perf_counter() - t0,
        )  # fmt: skip
    hot = int(min(max(hot_items, 0), n - 1))  # at least one ad left to partition
    weights = None if sample_weights is None else np.asarray(sample_weights, np.float64).reshape(-1)
    if hot:
        by_weight = np.argsort(-weights, kind="stable")  # weight descending, then row ascending
        hot_rows = np.sort(by_weight[:hot]).astype(np.int32)
        cold_rows = np.sort(by_weight[hot:]).astype(np.int32)
    else:
        hot_rows, cold_rows = np.zeros(0, np.int32), np.arange(n, dtype=np.int32)
    split = None if primary is None else np.asarray(primary, bool).reshape(-1)[cold_rows]
    if split is not None and (split.all() or not split.any()):
        split = None  # one group: nothing to split off
    group_rows = [cold_rows] if split is None else [cold_rows[split], cold_rows[~split]]
    step = 1 << 22
    centroids, labels, sizes_p, groups = [], [], [], 0
    for g, rows_g in enumerate(group_rows):
        ng = len(rows_g)
        if g == 0:
            pg = int(min(ng, n_partitions or default_n_partitions(ng)))
        else:
            pg = int(min(ng, rest_partitions or max(1, round(math.sqrt(ng)))))
        groups_g = round(math.sqrt(pg)) if pg >= two_level_from else 0
        groups = max(groups, groups_g)
        xg = x[rows_g] if len(rows_g) < n else x
        c = spherical_kmeans(
            xg, pg, iters=kmeans_iters, sample_per_cluster=sample_per_partition, max_sample=max_sample,
            groups=groups_g, seed=seed + g, weights=None if weights is None else weights[rows_g],
        )  # fmt: skip
        lab = np.concatenate([assign(xg[s : s + step], c, groups=groups_g) for s in range(0, ng, step)])
        centroids.append(c)
        labels.append(lab + sum(sizes_p))
        sizes_p.append(pg)
        del xg
    p0, p = sizes_p[0], sum(sizes_p)
    centroids = np.concatenate(centroids)
    probe = int(min(p0, nprobe or default_nprobe(p0)))
    probe_rest = int(min(p - p0, nprobe_rest or 0))
    labels = np.concatenate(labels)
    grouped = np.concatenate(group_rows)
    # hot tier (corpus order), then partition by partition (primary group first; corpus order inside each)
    order = np.concatenate([hot_rows, grouped[np.argsort(labels, kind="stable")]]).astype(np.int32)
    offsets = (hot + np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=p))])).astype(np.int32)
    table = x[order]
    quantized = scale = None
    if quantization == "int8":
        scale = (np.abs(table).max(axis=0) / 127.0).astype(np.float32)
        scale[scale == 0] = 1.0
        quantized = np.empty(table.shape, np.int8)
        for s in range(0, n, step):
            quantized[s : s + step] = np.clip(np.rint(table[s : s + step] / scale), -127, 127)
    elif quantization == "bf16":
        quantized = tf.cast(tf.constant(table), tf.bfloat16).numpy()
    sizes = np.diff(offsets)
    config.update(
        n_partitions=p,
        nprobe=probe,
        primary_partitions=p0,
        nprobe_rest=probe_rest,
        primary_items=len(group_rows[0]) if split is not None else 0,
        hot_items=hot,
        quantization=quantization,
        rescore=int(rescore) if quantization != "none" else 0,
        empty_partitions=int((sizes == 0).sum()),
        largest_partition=int(sizes.max()),
        assignment=f"two-level, {groups} groups, 16 per row" if groups else "flat",
    )
    tables = IVFTables(mode, table, ids[order], order, centroids, offsets, quantized, scale, config, 0.0)
    config["nprobe_source"] = "given" if nprobe else "default"
    config["kmeans_sample"] = "uniform" if sample_weights is None else "weighted"
    if target_overlap is not None and calibration_queries is not None and not nprobe:
        found = calibrate_nprobe(tables, calibration_queries, target_overlap)
        config.update(
            nprobe=found["nprobe"], nprobe_rest=found["nprobe_rest"], nprobe_source="target_overlap", calibration=found
        )
    tables.build_seconds = time.perf_counter() - t0
    return tables


# --------------------------------------------------------------------------- nprobe calibration


def exact_top_k(table: np.ndarray, queries: np.ndarray, k: int, chunk: int = 256) -> np.ndarray:
    """Table rows of each query's exact top ``k`` (brute force, chunked), ``[nq, min(k, N)]``."""
    t = tf.constant(table, tf.float32)
    k = min(k, len(table))
    out = []
    for s in range(0, len(queries), chunk):
        scores = tf.matmul(tf.constant(queries[s : s + chunk], tf.float32), t, transpose_b=True)
        out.append(tf.math.top_k(scores, k).indices.numpy())
    return np.concatenate(out) if out else np.zeros((0, k), np.int32)


def _groups(tables: IVFTables) -> tuple[int, int]:
    """(primary partitions, all partitions): partitions ``[p0, P)`` are the rest group (none if p0 = P)."""
    p = len(tables.offsets) - 1
    return int(tables.config.get("primary_partitions") or p), p


def probe_ranks(tables: IVFTables, queries: np.ndarray, k: int) -> np.ndarray:
    """``[nq, k]``: for each query's exact top-``k`` ad, the rank (0 = probed first) of its partition
    in the query's partition order within its group (-1: the hot tier). ``mean(ranks < nprobe)`` is the
    share of the exact top-k that ``nprobe`` partitions hold, i.e. the overlap@k the index reaches when
    re-scoring keeps them. With a rest group its ads' ranks are offset by :data:`REST_RANK` (so
    ``ranks - REST_RANK`` is their rank among the rest partitions)."""
    queries = np.asarray(queries, np.float32)
    top = exact_top_k(tables.embeddings, queries, k)
    sizes = np.diff(tables.offsets)
    p0, p = _groups(tables)
    hot = int(tables.offsets[0])
    part = np.repeat(np.arange(-1, p, dtype=np.int32), np.concatenate([[hot], sizes]))  # hot: -1
    scores = tf.matmul(tf.constant(queries), tf.constant(tables.centroids), transpose_b=True)
    rank = np.empty((len(queries), p + 1), np.int64)  # column 0: the hot tier, rank -1
    rank[:, 0] = -1
    rows = np.arange(len(queries))[:, None]
    for lo, hi, base in ((0, p0, 0), (p0, p, REST_RANK)):
        if hi > lo:  # the same order search() probes each group in
            order = tf.math.top_k(scores[:, lo:hi], hi - lo).indices.numpy() + lo
            rank[rows, order + 1] = base + np.arange(hi - lo)[None, :]
    return np.take_along_axis(rank, part[top] + 1, axis=1)


REST_RANK = 1 << 40


def overlap_curve(ranks: np.ndarray, nprobes, nprobe_rest: int = 0) -> dict[int, float]:
    """Overlap@k at each ``nprobe`` (and ``nprobe_rest`` rest partitions) from :func:`probe_ranks`."""
    rest = ranks >= REST_RANK
    got_rest = rest & (ranks - REST_RANK < nprobe_rest)
    return {int(n): float(np.mean((~rest & (ranks < n)) | got_rest)) if ranks.size else 1.0 for n in nprobes}


def calibrate_nprobe(tables: IVFTables, queries: np.ndarray, target: float, k: int | None = None) -> dict:
    """The smallest ``nprobe`` whose probed partitions hold a share ``>= target`` of the exact top-``k``
    (default ``max_k``) of sample ``queries``: ``{"nprobe", "nprobe_rest", "overlap", "queries", "target"}``.

    With a rest group, every ``nprobe_rest`` in 0, 1, 2, 4, ... is tried with its smallest primary
    ``nprobe``, and the pair with the fewest candidates on these queries wins."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target overlap must be in (0, 1], got {target}")
    k = int(k or tables.config["max_k"])
    ranks = probe_ranks(tables, queries, k)
    p0, p = _groups(tables)
    sizes = np.diff(tables.offsets)
    queries = np.asarray(queries, np.float32)
    scores = queries @ tables.centroids.T if len(queries) else np.zeros((0, p), np.float32)
    mean_cum = []  # mean candidates of the n best partitions of each group (index n)
    for lo, hi in ((0, p0), (p0, p)):
        order = np.argsort(-scores[:, lo:hi], axis=1, kind="stable") + lo
        mean_cum.append(np.concatenate([[0.0], np.cumsum(sizes[order], axis=1).mean(0) if len(queries) else []]))
    rest_options = [0] + [r for r in (2**i for i in range(40)) if r <= p - p0] if p > p0 else [0]
    best = None
    flat = np.sort(ranks[ranks < REST_RANK].ravel())
    need = math.ceil(target * ranks.size - 1e-9)  # that many (query, ad) pairs must be probed
    for n_rest in rest_options:
        missing = need - int(np.sum((ranks >= REST_RANK) & (ranks - REST_RANK < n_rest)))
        if missing > len(flat):
            continue  # not reachable with this many rest partitions
        nprobe = 1 if missing <= 0 else int(max(1, min(p0, flat[missing - 1] + 1)))  # hot tier alone: rank -1
        cost = mean_cum[0][min(nprobe, p0)] + (mean_cum[1][n_rest] if p > p0 and len(queries) else 0.0)
        if best is None or cost < best[0]:
            best = (cost, nprobe, n_rest)
    if best is None or not ranks.size:
        best = (0.0, 1, 0)
    _, nprobe, n_rest = best
    return {
        "nprobe": nprobe,
        "nprobe_rest": n_rest,
        "overlap": overlap_curve(ranks, [nprobe], n_rest)[nprobe],
        "candidates": round(float(best[0]) + int(tables.offsets[0]), 1),
        "queries": len(queries),
        "target": float(target),
    }


# --------------------------------------------------------------------------------------- query


def _order_key(scores: tf.Tensor, rows: tf.Tensor) -> tf.Tensor:
    """int64 key whose descending order is (score descending, row ascending); ``rows < 2**32``."""
    scores = tf.where(tf.equal(scores, 0.0), tf.zeros_like(scores), scores)  # -0.0 == +0.0
    bits = tf.bitcast(scores, tf.int32)
    bits = tf.where(bits < 0, tf.bitwise.bitwise_xor(bits, tf.constant(0x7FFFFFFF, tf.int32)), bits)
    return tf.cast(bits, tf.int64) * (1 << 32) + ((1 << 32) - 1 - tf.cast(rows, tf.int64))


def _pad_cols(x: tf.Tensor, n: tf.Tensor, value) -> tf.Tensor:
    """Pad the last axis of ``x [B, c]`` with ``value`` up to at least ``n`` columns."""
    extra = tf.maximum(n - tf.shape(x)[1], 0)
    return tf.pad(x, [[0, 0], [0, extra]], constant_values=value)


class IVFIndex(tf.Module):
    """Serving-side index: tables as non-trainable ``tf.Variable`` s (so ``tf.saved_model.save``
    writes them to ``variables/``, not into the 2 GB-limited graph) and the query graph.

    Use from an exporting ``tf.Module``: hold it as an attribute and call :meth:`search` inside
    the signature's ``tf.function``.
    """

    def __init__(self, tables: IVFTables, name: str = "ivf_index"):
        super().__init__(name=name)
        cfg = tables.config
        # JSON text, not a dict: tf.Module would wrap a (nested) dict attribute into trackable wrappers
        self._config_json = json.dumps(dict(cfg, build_seconds=round(tables.build_seconds, 3)))
        self.mode, self.max_k, self.n_items, self.dim = cfg["mode"], cfg["max_k"], cfg["n_items"], cfg["dim"]
        self.nprobe, self.quantization, self.rescore = cfg["nprobe"], cfg["quantization"], cfg["rescore"]
        self.hot = int(tables.offsets[0]) if self.mode == "ivf" else 0  # rows every query scores
        self.n_partitions = len(tables.offsets) - 1 if self.mode == "ivf" else 0
        self.primary_partitions = int(cfg.get("primary_partitions") or self.n_partitions)
        self.nprobe_rest = int(min(cfg.get("nprobe_rest") or 0, self.n_partitions - self.primary_partitions))
        self.nprobe = int(min(self.nprobe, self.primary_partitions))

        def var(value, dtype, vname):
            return tf.Variable(value, dtype=dtype, trainable=False, name=vname)

        self.embeddings = var(tables.embeddings, tf.float32, "embeddings")
        self.ids = var(tables.ids, tf.int64, "ids")
        if self.mode == "ivf":
            self.rows = var(tables.rows, tf.int32, "rows")
            self.centroids = var(tables.centroids, tf.float32, "centroids")
            self.offsets = var(tables.offsets, tf.int32, "offsets")
            if self.quantization == "int8":
                self.quantized = var(tables.quantized, tf.int8, "quantized")
                self.scale = var(tables.scale, tf.float32, "scale")
            elif self.quantization == "bf16":
                self.quantized = var(tables.quantized, tf.bfloat16, "quantized")

    @classmethod
    def build(cls, embeddings: np.ndarray, ids: np.ndarray, **params) -> IVFIndex:
        """``build_tables(embeddings, ids, **params)`` wrapped into an index."""
        return cls(build_tables(embeddings, ids, **params))

    def get_config(self) -> dict:
        """Parameters and build statistics (JSON-serialisable, for ``model_info.json``)."""
        return json.loads(self._config_json)

    def memory_bytes(self) -> int:
        """Bytes held by the index tables."""
        return int(sum(v.shape.num_elements() * v.dtype.size for v in self.variables))

    # -- graph pieces

    def _check_k(self, queries: tf.Tensor, k: tf.Tensor | None) -> tuple[tf.Tensor, tf.Tensor]:
        """``k [B]`` int32 (validated) and ``max(k)`` (the output width)."""
        if k is None:
            k = tf.fill(tf.shape(queries)[:1], self.max_k)
            return k, tf.constant(self.max_k)
        k = tf.cast(tf.reshape(k, [-1]), tf.int64)
        checks = [
            tf.debugging.assert_equal(tf.shape(k)[0], tf.shape(queries)[0], message="k must have shape [B]"),
            tf.debugging.assert_greater_equal(k, tf.constant(1, tf.int64), message="k must be >= 1"),
            tf.debugging.assert_less_equal(k, tf.constant(self.max_k, tf.int64), message=f"k must be <= {self.max_k}"),
        ]
        with tf.control_dependencies(checks):
            k = tf.cast(tf.identity(k), tf.int32)
        return k, tf.maximum(tf.reduce_max(k), 0)

    def _finish(
        self, queries: tf.Tensor, pos: tf.Tensor, k: tf.Tensor, kmax: tf.Tensor, table: tf.Tensor | None = None
    ) -> dict[str, tf.Tensor]:
        """Exact float32 scores of table rows ``pos [B, c]`` (-1 = none) -> ordered top ``k``.

        ``table``: the embeddings already read densely in this call (see :meth:`search`).
        """
        pos = _pad_cols(pos, kmax, -1)
        valid = pos >= 0
        safe = tf.maximum(pos, 0)
        table = self.embeddings if table is None else table
        scores = tf.reduce_sum(tf.gather(table, safe) * queries[:, None, :], axis=-1)
        rows = tf.gather(self.rows, safe) if self.mode == "ivf" else safe
        key = tf.where(valid, _order_key(scores, rows), _MIN_KEY)
        top_key, j = tf.math.top_k(key, kmax)
        ok = (top_key > _MIN_KEY) & (tf.range(kmax)[None, :] < k[:, None])
        return {
            "top_k_ids": tf.where(ok, tf.gather(self.ids, tf.gather(safe, j, batch_dims=1)), tf.constant(-1, tf.int64)),
            "top_k_scores": tf.where(ok, tf.gather(scores, j, batch_dims=1), -np.inf),
        }

    def _candidates(self, queries: tf.Tensor) -> tf.Tensor:
        """Table rows of the ``nprobe`` best partitions of each query, ``[B, max count]``, -1 padded."""
        scores = tf.matmul(queries, self.centroids, transpose_b=True)
        if self.primary_partitions == self.n_partitions:
            _, probe = tf.math.top_k(scores, self.nprobe)
        else:  # the primary group's nprobe best, then the rest group's nprobe_rest best
            p0 = self.primary_partitions
            _, probe = tf.math.top_k(scores[:, :p0], self.nprobe)
            if self.nprobe_rest:
                _, rest = tf.math.top_k(scores[:, p0:], self.nprobe_rest)
                probe = tf.concat([probe, rest + p0], axis=1)
        starts = tf.gather(self.offsets, probe)
        ends = tf.gather(self.offsets, probe + 1)
        if self.hot:  # the hot tier, rows [0, hot), as one more probed range
            b = tf.shape(queries)[:1]
            starts = tf.concat([tf.zeros(tf.concat([b, [1]], 0), tf.int32), starts], axis=1)
            ends = tf.concat([tf.fill(tf.concat([b, [1]], 0), self.hot), ends], axis=1)
        ranges = tf.ragged.range(tf.reshape(starts, [-1]), tf.reshape(ends, [-1]))
        counts = tf.reduce_sum(ends - starts, axis=1)
        per_query = tf.RaggedTensor.from_row_lengths(ranges.flat_values, counts, validate=False)
        return per_query.to_tensor(default_value=-1)

    @tf.autograph.experimental.do_not_convert  # no tensor-dependent Python control flow in here
    def search(self, queries: tf.Tensor, k: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
        """Top-k of ``queries [B, d]``: ``top_k_ids`` (raw ids, int64) and ``top_k_scores`` ``[B, max(k)]``.

        ``k``: ``None`` (= ``max_k`` for every row) or ``[B]`` ints in ``[1, max_k]``.
        """
        queries = tf.convert_to_tensor(queries, tf.float32)
        k, kmax = self._check_k(queries, k)
        b = tf.shape(queries)[0]
        if self.n_items == 0:
            return {
                "top_k_ids": tf.fill([b, kmax], tf.constant(-1, tf.int64)),
                "top_k_scores": tf.fill([b, kmax], tf.constant(-np.inf, tf.float32)),
            }
        if self.mode == "exact":
            # Each variable is either only read densely or only gathered from: a ResourceGather on a
            # variable whose dense read is still alive copies the whole table (copy-on-read mode).
            table = tf.convert_to_tensor(self.embeddings)
            scores = tf.matmul(queries, table, transpose_b=True)
            _, pos = tf.math.top_k(scores, tf.minimum(kmax, self.n_items))
            return self._finish(queries, pos, k, kmax, table)

        pos = self._candidates(queries)
        valid = pos >= 0
        safe = tf.maximum(pos, 0)
        if self.quantization == "none":
            vectors, q = tf.gather(self.embeddings, safe), queries
        elif self.quantization == "int8":  # (q * scale) . int8 row == q . dequantized row
            vectors, q = tf.cast(tf.gather(self.quantized, safe), tf.float32), queries * self.scale
        else:  # bf16 x bf16 matmul (f32 accumulation in oneDNN), bf16 scores: first pass only
            vectors, q = tf.gather(self.quantized, safe), tf.cast(queries, tf.bfloat16)
        scores = tf.cast(tf.matmul(q[:, None, :], vectors, transpose_b=True)[:, 0, :], tf.float32)  # [B, C]
        if self.quantization == "none":  # exact already: select with the total order
            key = _pad_cols(tf.where(valid, _order_key(scores, tf.gather(self.rows, safe)), _MIN_KEY), kmax, _MIN_KEY)
            top_key, j = tf.math.top_k(key, kmax)
            keep = top_key > _MIN_KEY
        else:  # approximate: keep rescore * kmax for the exact pass
            m = self.rescore * kmax
            scores = _pad_cols(tf.where(valid, scores, -np.inf), m, -np.inf)
            top_score, j = tf.math.top_k(scores, m)
            keep = top_score > -np.inf
        pos = _pad_cols(pos, tf.shape(j)[1], -1)
        return self._finish(queries, tf.where(keep, tf.gather(pos, j, batch_dims=1), -1), k, kmax)

    # -- signatures

    def signatures(self) -> dict[str, tf.types.experimental.ConcreteFunction]:
        """Stand-alone serving signatures: ``serving_default(queries)`` (k = max_k) and
        ``with_k(queries, k)``."""
        spec_q = tf.TensorSpec([None, self.dim], tf.float32, name="queries")
        spec_k = tf.TensorSpec([None], tf.int64, name="k")
        default = tf.function(lambda queries: self.search(queries), input_signature=[spec_q])
        with_k = tf.function(lambda queries, k: self.search(queries, k), input_signature=[spec_q, spec_k])
        return {"serving_default": default.get_concrete_function(), "with_k": with_k.get_concrete_function()}
