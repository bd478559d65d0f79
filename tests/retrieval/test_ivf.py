"""IVF index: exactness at nprobe = all, recall vs nprobe, k per request, edge cases, SavedModel
round trip in a v1 Session (how TF Serving runs it) and a core-ops-only check."""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf

from tfrs_ctx.retrieval.core_ops import non_core_ops, saved_model_ops
from tfrs_ctx.retrieval.ivf import IVFIndex, assign, build_tables, spherical_kmeans

D = 16


def dyadic(n: int, seed: int, d: int = D) -> np.ndarray:
    """Vectors with components in {-8..8}/16: every dot product is exact in float32 whatever
    the summation order, so matmul, batched matmul and reduce_sum agree bit for bit."""
    return np.random.default_rng(seed).integers(-8, 9, (n, d)).astype(np.float32) / 16


def clustered(n: int, seed: int, n_clusters: int = 40, d: int = D) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, d))
    x = centers[rng.integers(0, n_clusters, n)] + 0.5 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def raw_ids(n: int) -> np.ndarray:
    return (np.random.default_rng(123).permutation(n) * 10 + 7).astype(np.int64)


def reference(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy brute force, order (score desc, row asc), padded with (-1, -inf)."""
    out_ids, out_scores = np.full((len(q), k), -1, np.int64), np.full((len(q), k), -np.inf, np.float32)
    for b, s in enumerate(q @ x.T if len(x) else np.zeros((len(q), 0), np.float32)):
        rows = np.lexsort((np.arange(len(s)), -s))[:k]
        out_ids[b, : len(rows)], out_scores[b, : len(rows)] = ids[rows], s[rows]
    return out_ids, out_scores


def ivf(x, ids, **kw) -> IVFIndex:
    return IVFIndex.build(x, ids, exact_threshold=0, **kw)


def search(index: IVFIndex, q: np.ndarray, k=None) -> tuple[np.ndarray, np.ndarray]:
    r = index.search(tf.constant(q), None if k is None else tf.constant(k, tf.int64))
    return r["top_k_ids"].numpy(), r["top_k_scores"].numpy()


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(x[x >= 0], y[y >= 0])) / len(y) for x, y in zip(a, b, strict=True)]))


@pytest.mark.parametrize("quantization", ["none", "int8", "bf16"])
def test_nprobe_all_equals_brute_force_exactly(quantization):
    x, ids, q = dyadic(1500, 0), raw_ids(1500), dyadic(7, 1)
    exact = IVFIndex.build(x, ids, max_k=40)
    assert exact.get_config()["mode"] == "exact"
    # rescore * k >= N: every candidate of a quantized first pass is re-scored in float32
    index = ivf(x, ids, max_k=40, n_partitions=24, nprobe=24, quantization=quantization, rescore=40)
    assert index.get_config()["mode"] == "ivf"
    want = reference(x, ids, q, 40)
    for got in (search(exact, q), search(index, q)):
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_nprobe_all_equals_brute_force_on_real_valued_vectors():
    """Final scores are recomputed by one formula in both modes: bit-identical, not just close."""
    x, q = clustered(3000, 0), clustered(20, 1)
    ids = raw_ids(3000)
    e_ids, e_scores = search(IVFIndex.build(x, ids, max_k=50), q)
    i_ids, i_scores = search(ivf(x, ids, max_k=50, n_partitions=30, nprobe=30, quantization="none"), q)
    np.testing.assert_array_equal(i_ids, e_ids)
    np.testing.assert_array_equal(i_scores, e_scores)
    r_ids, r_scores = reference(x, ids, q, 50)
    assert overlap(e_ids, r_ids) == 1.0
    np.testing.assert_allclose(e_scores, r_scores, rtol=1e-5, atol=1e-6)


def test_overlap_grows_with_nprobe():
    x, ids, q = clustered(6000, 2), raw_ids(6000), clustered(50, 3)
    truth, _ = reference(x, ids, q, 50)
    tables = build_tables(x, ids, max_k=50, n_partitions=48, exact_threshold=0, quantization="int8", rescore=4)
    overlaps = []
    for nprobe in (1, 2, 4, 8, 16, 48):
        index = IVFIndex(tables)
        index.nprobe = nprobe  # trace-time constant
        overlaps.append(overlap(search(index, q)[0], truth))
    assert overlaps == sorted(overlaps), overlaps
    assert overlaps[0] < 0.9 and overlaps[-1] == 1.0, overlaps


@pytest.mark.parametrize("mode", ["exact", "ivf"])
def test_k_per_request(mode):
    x, ids, q = dyadic(800, 4), raw_ids(800), dyadic(4, 5)
    index = IVFIndex.build(x, ids, max_k=30, exact_threshold=10_000 if mode == "exact" else 0, n_partitions=8)
    full_ids, full_scores = search(index, q)
    assert full_ids.shape == (4, 30)  # k omitted: the exported max_k
    got_ids, got_scores = search(index, q, [5] * 4)
    assert got_ids.shape == (4, 5)
    np.testing.assert_array_equal(got_ids, full_ids[:, :5])
    ks = [1, 30, 7, 12]
    got_ids, got_scores = search(index, q, ks)
    assert got_ids.shape == (4, 30)  # max(k) columns, row b padded beyond k[b]
    for b, k in enumerate(ks):
        np.testing.assert_array_equal(got_ids[b, :k], full_ids[b, :k])
        np.testing.assert_array_equal(got_scores[b, :k], full_scores[b, :k])
        assert (got_ids[b, k:] == -1).all() and np.isneginf(got_scores[b, k:]).all()


@pytest.mark.parametrize("bad", [[0], [-3], [31], [5, 0], [1, 1, 1]])
def test_bad_k_is_invalid_argument(bad):
    x, ids = dyadic(200, 6), raw_ids(200)
    q = dyadic(1 if len(bad) == 1 else 2, 7)
    for index in (IVFIndex.build(x, ids, max_k=30), ivf(x, ids, max_k=30, n_partitions=4)):
        with pytest.raises(tf.errors.InvalidArgumentError):
            search(index, q, bad)
        fn = index.signatures()["with_k"]  # graph mode too
        with pytest.raises(tf.errors.InvalidArgumentError):
            fn(queries=tf.constant(q), k=tf.constant(bad, tf.int64))


def test_empty_corpus():
    index = IVFIndex.build(np.zeros((0, D), np.float32), np.zeros(0, np.int64), max_k=10, exact_threshold=-1)
    assert index.get_config()["mode"] == "exact"
    got_ids, got_scores = search(index, dyadic(3, 8), [4, 10, 1])
    assert got_ids.shape == (3, 10) and (got_ids == -1).all() and np.isneginf(got_scores).all()
    assert search(index, np.zeros((0, D), np.float32))[0].shape == (0, 10)


def test_tiny_corpus_fewer_ads_than_k_and_partitions_than_nprobe():
    x, ids, q = dyadic(5, 9), raw_ids(5), dyadic(3, 10)
    index = ivf(x, ids, max_k=10, n_partitions=16, nprobe=8)
    cfg = index.get_config()
    assert cfg["n_partitions"] == 5 and cfg["nprobe"] == 5
    for got, want in zip(search(index, q), reference(x, ids, q, 10), strict=True):
        np.testing.assert_array_equal(got, want)
    assert (search(index, q)[0][:, 5:] == -1).all()


def test_empty_partitions_and_ties():
    base = dyadic(3, 11)  # 3 distinct vectors, each repeated: ties, and most partitions stay empty
    x = np.repeat(base, 20, axis=0)[np.random.default_rng(0).permutation(60)]
    ids, q = raw_ids(60), dyadic(4, 12)
    index = ivf(x, ids, max_k=25, n_partitions=8, nprobe=8)
    cfg = index.get_config()
    assert cfg["empty_partitions"] >= 5, cfg
    want = reference(x, ids, q, 25)  # ties broken by corpus row, ascending
    for got in (search(index, q), search(IVFIndex.build(x, ids, max_k=25), q)):
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    few = ivf(x, ids, max_k=25, n_partitions=8, nprobe=1)  # one partition of 20: 5 padded results
    got_ids, _ = search(few, q)
    assert ((got_ids == -1).sum(axis=1) >= 5).all()


def test_two_level_assignment():
    """Large P: k-means and assignment through a coarse level; still exact at nprobe = all."""
    x, ids, q = clustered(3000, 17, n_clusters=60), raw_ids(3000), clustered(5, 18)
    index = ivf(x, ids, max_k=30, n_partitions=100, nprobe=100, two_level_from=64)
    assert index.get_config()["assignment"].startswith("two-level")
    for got, want in zip(search(index, q), search(IVFIndex.build(x, ids, max_k=30), q), strict=True):
        np.testing.assert_array_equal(got, want)
    centroids = index.centroids.numpy()
    flat = assign(x, centroids)
    two = assign(x, centroids, groups=10, neighbours=4)
    assert (flat == two).mean() > 0.8
    assert (assign(x, centroids, groups=10, neighbours=10) == flat).all()  # all groups: exact


@pytest.mark.parametrize("quantization", ["none", "int8", "bf16"])
def test_batch_equals_single_rows(quantization):
    x, ids, q = clustered(4000, 13), raw_ids(4000), clustered(9, 14)
    index = ivf(x, ids, max_k=20, n_partitions=40, nprobe=3, quantization=quantization)
    fn = index.signatures()["with_k"]
    ks = np.array([20, 3, 20, 11, 1, 20, 5, 20, 8])
    batch = fn(queries=tf.constant(q), k=tf.constant(ks))
    for b in range(len(q)):
        row = fn(queries=tf.constant(q[b : b + 1]), k=tf.constant(ks[b : b + 1]))
        n = ks[b]
        np.testing.assert_array_equal(batch["top_k_ids"][b, :n], row["top_k_ids"][0])
        np.testing.assert_array_equal(batch["top_k_scores"][b, :n], row["top_k_scores"][0])


class _Export(tf.Module):
    def __init__(self, index: IVFIndex):
        super().__init__()
        self.index = index


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    x, ids = clustered(3000, 15), raw_ids(3000)
    index = ivf(x, ids, max_k=20, n_partitions=30, nprobe=4, quantization="int8")
    path = str(tmp_path_factory.mktemp("ivf") / "1")
    tf.saved_model.save(_Export(index), path, signatures=index.signatures())
    return index, path


def test_saved_model_in_v1_session(saved):
    index, path = saved
    q, ks = clustered(6, 16), np.array([20, 1, 5, 20, 2, 9], np.int64)
    want = index.search(tf.constant(q), tf.constant(ks))
    want_default = index.search(tf.constant(q))
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        meta = tf.compat.v1.saved_model.load(sess, ["serve"], path)

        def run(name, feeds):
            sig = meta.signature_def[name]
            fetch = {k: v.name for k, v in sig.outputs.items()}
            return sess.run(fetch, {sig.inputs[k].name: v for k, v in feeds.items()})

        got = run("with_k", {"queries": q, "k": ks})
        got_default = run("serving_default", {"queries": q})
        with pytest.raises(tf.errors.InvalidArgumentError):
            run("with_k", {"queries": q, "k": np.zeros(6, np.int64)})
    for name in ("top_k_ids", "top_k_scores"):
        np.testing.assert_array_equal(got[name], want[name].numpy())
        np.testing.assert_array_equal(got_default[name], want_default[name].numpy())
    assert got_default["top_k_ids"].shape == (6, 20)


def test_core_ops_only(saved):
    """Core = registered in the installed TF's op registry, compiled into TensorFlow itself
    (has a ``tf.raw_ops`` endpoint: ops of ``tf.load_op_library`` libraries, e.g. ScaNN's, have
    none) and with a kernel a CPU ``tensorflow_model_server`` can run (registered for CPU, or for
    DEFAULT = every device, as ``Assert`` and ``NoOp`` are)."""
    _, path = saved
    ops = saved_model_ops(path)
    print(f"\nSavedModel op types ({len(ops)}): {sorted(ops)}")
    not_core = non_core_ops(ops)
    assert not not_core, not_core
    assert not any("scann" in op.lower() for op in ops)
    assert {"RaggedRange", "TopKV2", "ResourceGather"} <= ops


def test_target_overlap_calibrates_nprobe_on_sample_queries():
    """Queries unlike the ads (far from every cluster) need many more partitions than the size
    rule gives; the calibrated nprobe reaches the target on held-out queries of the same kind."""
    x, ids = clustered(8000, 4), raw_ids(8000)
    rng = np.random.default_rng(5)
    calib, held_out = (rng.standard_normal((n, D)).astype(np.float32) for n in (300, 200))
    truth, _ = reference(x, ids, held_out, 50)
    common = {"max_k": 50, "n_partitions": 128, "exact_threshold": 0, "quantization": "int8", "rescore": 4}
    default = IVFIndex.build(x, ids, **common)
    assert default.get_config()["nprobe_source"] == "default"
    tables = build_tables(x, ids, target_overlap=0.95, calibration_queries=calib, **common)
    cfg = tables.config
    assert cfg["nprobe_source"] == "target_overlap" and cfg["calibration"]["queries"] == 300
    assert cfg["calibration"]["overlap"] >= 0.95 and default.nprobe < cfg["nprobe"] < 128
    assert overlap(search(default, held_out)[0], truth) < 0.9
    assert overlap(search(IVFIndex(tables), held_out)[0], truth) >= 0.92
    lower = build_tables(x, ids, target_overlap=0.8, calibration_queries=calib, **common).config["nprobe"]
    every = build_tables(x, ids, target_overlap=1.0, calibration_queries=calib, **common).config
    assert lower <= cfg["nprobe"] <= every["nprobe"] and every["calibration"]["overlap"] == 1.0
    given = build_tables(x, ids, nprobe=3, target_overlap=0.95, calibration_queries=calib, **common).config
    assert given["nprobe"] == 3 and given["nprobe_source"] == "given"


def test_weighted_kmeans_sample_puts_centroids_where_the_weight_is():
    """Popular rows (weight 100) drawn into the sample far more often: more centroids near them."""
    x = clustered(4000, 6, n_clusters=8)
    popular = np.arange(len(x)) % 8 == 0  # an arbitrary eighth of the rows
    w = np.where(popular, 100.0, 0.1)
    near = {}
    for name, weights in (("uniform", None), ("weighted", w)):
        c = spherical_kmeans(x, 64, sample_per_cluster=8, seed=0, weights=weights)
        assert np.allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-5)
        sample_rows = assign(x, c)  # the partition each row falls in
        near[name] = len(np.unique(sample_rows[popular]))  # partitions the popular rows spread over
    assert near["weighted"] > near["uniform"], near
    tables = build_tables(x, raw_ids(4000), n_partitions=64, exact_threshold=0, sample_weights=w)
    assert tables.config["kmeans_sample"] == "weighted" and tables.offsets[-1] == 4000


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_hot_tier_nprobe_all_equals_brute_force_and_hot_ads_are_always_scored(quantization):
    """The hot tier (most popular ads) heads the table and every query scores it; the partitions hold
    the rest: nprobe = all is still brute force exactly, and nprobe = 1 still finds every hot ad."""
    x, ids, q = dyadic(1500, 0), raw_ids(1500), dyadic(9, 1)
    weights = np.random.default_rng(3).pareto(1.0, len(x)) + 0.1
    common = dict(max_k=40, n_partitions=20, quantization=quantization, rescore=40, sample_weights=weights)
    index = ivf(x, ids, nprobe=20, hot_items=200, **common)
    cfg = index.get_config()
    assert cfg["hot_items"] == 200 and index.hot == 200 and cfg["n_partitions"] == 20
    want = reference(x, ids, q, 40)
    got = search(index, q)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    # with one partition probed, the hot ads alone (brute force over them) are among the candidates
    hot = np.sort(np.lexsort((np.arange(len(x)), -weights))[:200])
    tables = build_tables(x, ids, exact_threshold=0, nprobe=1, hot_items=200, **common)
    np.testing.assert_array_equal(tables.rows[:200], hot)
    assert tables.offsets[0] == 200 and tables.offsets[-1] == 1500
    one = IVFIndex(tables)
    ids1, scores1 = search(one, q)
    hot_ids, hot_scores = reference(x[hot], ids[hot], q, 40)
    for h, hs, i, s in zip(hot_ids, hot_scores, ids1, scores1, strict=True):
        assert s[-1] >= hs[-1] and set(h[hs > s[-1]]) <= set(i)  # every hot ad above the cut is returned
    # the calibration counts the hot tier as always probed (rank -1): a tiny target needs one partition
    cal = build_tables(x, ids, exact_threshold=0, hot_items=200, target_overlap=0.01, calibration_queries=q, **common)
    assert cal.config["nprobe"] == 1
    with pytest.raises(ValueError, match="sample_weights"):
        build_tables(x, ids, exact_threshold=0, hot_items=10)


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_primary_group_nprobe_all_equals_brute_force_and_calibrates_both_groups(quantization):
    """The primary ads (those sample queries retrieved) get their own partitions and the rest a second
    group: probing every partition of both is brute force exactly (ties included, no id twice); without
    rest probes only primary ads come back; the calibration picks both nprobes and reaches its target."""
    x, ids, q = dyadic(1500, 0), raw_ids(1500), dyadic(9, 1)
    primary = np.zeros(len(x), bool)
    primary[np.random.default_rng(4).choice(len(x), 300, replace=False)] = True
    common = dict(max_k=40, n_partitions=12, rest_partitions=8, quantization=quantization, rescore=40)
    index = ivf(x, ids, nprobe=12, nprobe_rest=8, primary=primary, **common)
    cfg = index.get_config()
    assert (cfg["n_partitions"], cfg["primary_partitions"], cfg["primary_items"]) == (20, 12, 300)
    want = reference(x, ids, q, 40)
    got = search(index, q)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    only = search(ivf(x, ids, nprobe=12, primary=primary, **common), q)[0]
    assert set(only.ravel()) <= set(ids[primary]) | {-1}
    np.testing.assert_array_equal(only, reference(x[primary], ids[primary], q, 40)[0])
    for row in only:
        assert len(set(row[row >= 0])) == (row >= 0).sum()
    cal = build_tables(
        x, ids, exact_threshold=0, primary=primary, target_overlap=0.9, calibration_queries=q, **common
    ).config  # fmt: skip
    assert cal["nprobe_source"] == "target_overlap" and cal["calibration"]["overlap"] >= 0.9
    assert cal["nprobe"] <= 12 and cal["nprobe_rest"] == cal["calibration"]["nprobe_rest"] <= 8
