"""The training-data Beam pipeline, on real pipeline runs (DirectRunner) and real TFRecords."""

from __future__ import annotations

import glob
import json
import os
import pathlib
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from beam_pipelines import build_training_data as btd
from beam_pipelines import runner
from beam_pipelines.tables import DEAD_LETTER_DIR, KnownIds, typed_suspects, validate_event_chunk
from tfrs_ctx import schema as S
from tfrs_ctx.data import dataset, rawio
from tfrs_ctx.data import examples as T
from tfrs_ctx.data.tf_example_wire import serialize_examples
from tfrs_ctx.data.vocab import Vocabulary, load_vocab, load_vocabularies

T0 = 1_710_000_000
DAY = 86_400


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------
def build(raw: pathlib.Path, out: pathlib.Path, *flags: str) -> dict:
    return btd.run(["--input", str(raw), "--output", str(out), *flags], save_main_session=False)


def records(data_dir: pathlib.Path, split: str) -> list[bytes]:
    import tensorflow as tf

    files = sorted(glob.glob(S.tfrecord_pattern(str(data_dir), split)))
    return [r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP")]


def parsed(data_dir: pathlib.Path, split: str) -> dict[str, np.ndarray]:
    """Every example of a split, parsed with the schema-only tf.data reader."""
    features = S.split_features(split)
    batches = [{k: v.numpy() for k, v in b.items()} for b in dataset.make_dataset(str(data_dir), split, 512)]
    if not batches:
        return {name: np.zeros((0, *f.shape)) for name, f in features.items()}
    return {name: np.concatenate([b[name] for b in batches]) for name in features}


def sorted_events(raw: pathlib.Path) -> dict[int, pd.DataFrame]:
    """Each user's raw conversions sorted by (timestamp, item_id)."""
    frame = rawio.read_table(str(raw), S.CONVERSIONS).sort_values([S.USER_ID, S.TIMESTAMP, S.ITEM_ID])
    return {int(u): g.reset_index(drop=True) for u, g in frame.groupby(S.USER_ID)}


def categories_of(row: pd.Series, category_vocab: Vocabulary) -> tuple[list[int], list[float]]:
    """Top-C categories of a raw row by confidence, as (category indices, confidences), unpadded."""
    pairs = sorted(zip(row[S.CONFIDENCES], row[S.CATEGORIES], strict=True), key=lambda p: -p[0])[: S.MAX_CATEGORIES]
    return [category_vocab.index(int(c)) for _, c in pairs], [float(w) for w, _ in pairs]


# --------------------------------------------------------------------------------------
# Module fixtures: one run per configuration
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(small_data) -> pathlib.Path:
    """The session's default run on ``small_raw`` (conftest's ``small_data``)."""
    return small_data


@pytest.fixture(scope="module")
def examples(built) -> dict[str, dict[str, np.ndarray]]:
    return {split: parsed(built, split) for split in S.SPLITS}


@pytest.fixture(scope="module")
def metadata(built) -> dict:
    return dataset.load_metadata(str(built))


# --------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------
def test_default_runner_is_the_in_process_direct_runner_never_prism():
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
    from apache_beam.runners.portability.fn_api_runner.fn_runner import FnApiRunner

    options = PipelineOptions(["--input", "x", "--output", "y"])
    assert isinstance(runner.make_runner(options), FnApiRunner)
    assert options.view_as(StandardOptions).runner == "DirectRunner"
    options = PipelineOptions(["--runner=DirectRunner", "--direct_running_mode=multi_processing"])
    assert isinstance(runner.make_runner(options), FnApiRunner)


def test_cli_main_returns_zero(tmp_path, small_raw, capsys):
    assert btd.main(["--help"]) == 0
    assert "--input" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--input and --output"):
        btd.run(["--output", str(tmp_path)], save_main_session=False)


# --------------------------------------------------------------------------------------
# Outputs of a default run
# --------------------------------------------------------------------------------------
def test_outputs_exist_and_parse_with_the_schema_only_reader(built, examples, metadata):
    for split in S.SPLITS:
        files = sorted(os.path.basename(p) for p in glob.glob(S.tfrecord_pattern(str(built), split)))
        assert files == [f"part-{i:05d}-of-00004{S.TFRECORD_SUFFIX}" for i in range(4)]
        assert len(examples[split][S.EX_USER_ID]) == metadata["counts"][split] > 0
        for name, feature in S.split_features(split).items():
            values = examples[split][name]
            assert values.shape[1:] == feature.shape, name
            assert values.dtype == (np.int64 if feature.dtype == "int64" else np.float32), name
    assert "apache_beam.runners.portability.prism_runner" not in sys.modules  # never tried
    assert metadata["schema_version"] == S.SCHEMA_VERSION
    # the synthetic default has the search surface: both optional tables, both search splits
    assert metadata["dead_letter"] == {name: 0 for name in [*S.RAW_TABLES, *S.OPTIONAL_RAW_TABLES]}
    assert metadata["options"]["context_drop_prob"] == 0.3
    for split in S.SEARCH_SPLITS:
        assert len(glob.glob(S.tfrecord_pattern(str(built), split))) == 4 and metadata["counts"][split] > 0


def test_vocabularies_item_counts_and_corpus(built, small_raw, examples, metadata):
    items = rawio.read_table(str(small_raw), S.ITEMS)
    item_vocab = load_vocab(str(built), S.VOCAB_ITEM)
    assert sorted(map(int, item_vocab)) == sorted(items[S.ITEM_ID].tolist())  # the whole ad corpus
    counts = pd.read_csv(built / S.ITEM_COUNTS_FILE, sep="\t", header=None, names=["item", "count"])
    assert counts["item"].astype(str).tolist() == item_vocab
    order = sorted(zip(-counts["count"], counts["item"], strict=True))
    assert [int(i) for _, i in order] == counts["item"].tolist()  # by training count desc, then id
    labels = examples[S.SPLIT_TRAIN][S.LABEL_ITEM]
    expected = np.bincount(labels, minlength=len(item_vocab) + S.NUM_RESERVED_IDS)[S.NUM_RESERVED_IDS :]
    np.testing.assert_array_equal(counts["count"].to_numpy(), expected)
    np.testing.assert_allclose(
        examples[S.SPLIT_TRAIN][S.LABEL_SAMPLING_PROB], expected[labels - S.NUM_RESERVED_IDS] / len(labels), rtol=1e-6
    )
    for name in S.VOCABULARIES:
        values = load_vocab(str(built), name)
        assert len(values) == len(set(values)) > 0
        assert metadata["vocab_sizes"][name] == len(values) + S.NUM_RESERVED_IDS
    assert sorted(load_vocab(str(built), S.VOCAB_EVENT_TYPE)) == sorted(S.EVENT_TYPES)

    corpus = dataset.load_corpus(str(built))
    np.testing.assert_array_equal(corpus[S.ITEM_ID], [int(v) for v in item_vocab])
    np.testing.assert_array_equal(corpus[S.LABEL_ITEM], np.arange(len(item_vocab)) + S.NUM_RESERVED_IDS)
    categories = Vocabulary(load_vocab(str(built), S.VOCAB_CATEGORY))
    advertisers = Vocabulary(load_vocab(str(built), S.VOCAB_ADVERTISER))
    by_id = items.set_index(S.ITEM_ID)
    for k in (0, 17, len(item_vocab) - 1):
        row = by_id.loc[corpus[S.ITEM_ID][k]]
        cats, confs = categories_of(row, categories)
        np.testing.assert_array_equal(corpus[S.LABEL_CATEGORIES][k], S.pad_right(cats, S.MAX_CATEGORIES))
        np.testing.assert_allclose(corpus[S.LABEL_CONFIDENCES][k], S.pad_right(confs, S.MAX_CATEGORIES, 0.0))
        assert corpus[S.LABEL_ADVERTISER][k] == advertisers.index(int(row[S.ADVERTISER_ID]))
    # Label features of the examples are the label item's corpus row.
    train = examples[S.SPLIT_TRAIN]
    rows = train[S.LABEL_ITEM] - S.NUM_RESERVED_IDS
    np.testing.assert_array_equal(train[S.LABEL_CATEGORIES], corpus[S.LABEL_CATEGORIES][rows])
    np.testing.assert_array_equal(train[S.LABEL_ADVERTISER], corpus[S.LABEL_ADVERTISER][rows])


def test_no_leakage_across_the_time_split(built, small_raw, examples, metadata):
    cutoff = metadata["cutoff_timestamp"]
    conversions = rawio.read_table(str(small_raw), S.CONVERSIONS)
    requests = rawio.read_table(str(small_raw), S.REQUESTS)
    held_out = (requests[S.TIMESTAMP] >= cutoff).mean()  # the default: 20% of the requests (a quantile)
    assert 0.19 <= held_out <= 0.21
    train = examples[S.SPLIT_TRAIN]
    assert (train[S.EX_TIMESTAMP] < cutoff).all()
    assert len(train[S.EX_TIMESTAMP]) == (conversions[S.TIMESTAMP] < cutoff).sum()  # one per training conversion
    assert (examples[S.SPLIT_TRAIN_REQUESTS][S.EX_TIMESTAMP] < cutoff).all()
    assert (examples[S.SPLIT_EVAL][S.EX_TIMESTAMP] >= cutoff).all()

    # Rebuild every training history from the raw log: the events strictly before the target.
    item_vocab = Vocabulary(load_vocab(str(built), S.VOCAB_ITEM))
    events = sorted_events(small_raw)
    for i in range(len(train[S.EX_USER_ID])):
        user = events[int(train[S.EX_USER_ID][i])]
        ts = int(train[S.EX_TIMESTAMP][i])
        before = user[user[S.TIMESTAMP] < ts]
        assert (before[S.TIMESTAMP] < cutoff).all()
        expected = S.pad_left(item_vocab.indices(before[S.ITEM_ID].tolist()).tolist(), S.MAX_HISTORY)
        np.testing.assert_array_equal(train[S.HISTORY_ITEM][i], expected)
        assert train[S.HISTORY_LENGTH][i] == min(len(before), S.MAX_HISTORY)
    # Request histories: conversions strictly before the request only.
    for split in (S.SPLIT_EVAL, S.SPLIT_TRAIN_REQUESTS):
        ex = examples[split]
        for i in range(len(ex[S.EX_USER_ID])):
            user = events.get(int(ex[S.EX_USER_ID][i]))
            n_before = 0 if user is None else int((user[S.TIMESTAMP] < ex[S.EX_TIMESTAMP][i]).sum())
            assert ex[S.HISTORY_LENGTH][i] <= min(n_before, S.MAX_HISTORY)


def test_synthetic_context_follows_the_label_with_default_perturbation(examples):
    train = examples[S.SPLIT_TRAIN]
    cats, weights = train[S.CONTEXT_CATEGORIES], train[S.CONTEXT_WEIGHTS]
    label_cats, label_confs = train[S.LABEL_CATEGORIES], train[S.LABEL_CONFIDENCES]
    kept = dropped = 0
    for i in range(len(cats)):
        real = label_cats[i] != S.PAD_ID
        n = int((cats[i] != S.PAD_ID).sum())
        assert (cats[i][n:] == S.PAD_ID).all() and (weights[i][n:] == 0).all()  # right-padded, no holes
        positions = [int(np.flatnonzero(label_cats[i] == c)[0]) for c in cats[i][:n]]
        assert positions == sorted(positions)  # a subsequence of the label's categories
        conf = label_confs[i][positions]
        assert np.all(weights[i][:n] >= conf * 0.8 - 1e-6)
        assert np.all(weights[i][:n] <= np.minimum(conf * 1.2, 1) + 1e-6)
        kept, dropped = kept + n, dropped + int(real.sum()) - n
    assert 0.25 < dropped / (kept + dropped) < 0.35
    assert (train[S.EX_REQUEST_ID] == -1).all() and (train[S.SUBJECT_ITEM] == S.PAD_ID).all()


def test_request_context_comes_from_the_subject_item(built, small_raw, examples, metadata):
    subjects = rawio.read_table(str(small_raw), S.SUBJECT_ITEMS).set_index(S.ITEM_ID)
    requests = rawio.read_table(str(small_raw), S.REQUESTS).set_index(S.REQUEST_ID)
    categories = Vocabulary(load_vocab(str(built), S.VOCAB_CATEGORY))
    item_vocab = Vocabulary(load_vocab(str(built), S.VOCAB_ITEM))
    for split in (S.SPLIT_EVAL, S.SPLIT_TRAIN_REQUESTS):
        ex = examples[split]
        after = requests[S.TIMESTAMP] >= metadata["cutoff_timestamp"]
        expected = requests.index[after if split == S.SPLIT_EVAL else ~after]
        assert sorted(ex[S.EX_REQUEST_ID].tolist()) == sorted(expected.tolist())
        for i in range(len(ex[S.EX_REQUEST_ID])):
            request = requests.loc[int(ex[S.EX_REQUEST_ID][i])]
            cats, confs = categories_of(subjects.loc[request[S.SUBJECT_ITEM_ID]], categories)
            np.testing.assert_array_equal(ex[S.CONTEXT_CATEGORIES][i], S.pad_right(cats, S.MAX_CATEGORIES))
            np.testing.assert_allclose(ex[S.CONTEXT_WEIGHTS][i], S.pad_right(confs, S.MAX_CATEGORIES, 0.0))
            assert ex[S.LABEL_ITEM][i] == item_vocab.index(int(request[S.ITEM_ID]))
            # synthetic subject items are not ads (ad_id null): never an ad index, whatever their id
            assert ex[S.SUBJECT_ITEM][i] == S.PAD_ID


# --------------------------------------------------------------------------------------
# Perturbation settings and determinism (one more run each)
# --------------------------------------------------------------------------------------
def test_no_drop_no_jitter_gives_exactly_the_label_categories(small_raw, tmp_path):
    build(small_raw, tmp_path, "--context_drop_prob=0", "--context_weight_jitter=0")
    train = parsed(tmp_path, S.SPLIT_TRAIN)
    np.testing.assert_array_equal(train[S.CONTEXT_CATEGORIES], train[S.LABEL_CATEGORIES])
    np.testing.assert_array_equal(train[S.CONTEXT_WEIGHTS], train[S.LABEL_CONFIDENCES])


def test_drop_all_gives_empty_context_and_max_targets_keeps_the_last(small_raw, tmp_path, built, examples):
    metadata = build(small_raw, tmp_path, "--context_drop_prob=1", "--max_targets_per_user=3", "--num_shards=2")
    train = parsed(tmp_path, S.SPLIT_TRAIN)
    assert (train[S.CONTEXT_CATEGORIES] == S.PAD_ID).all() and (train[S.CONTEXT_WEIGHTS] == 0).all()
    assert len(glob.glob(S.tfrecord_pattern(str(tmp_path), S.SPLIT_TRAIN))) == 2
    full = examples[S.SPLIT_TRAIN]
    expected = set()
    for user in np.unique(full[S.EX_USER_ID]):
        ts = np.sort(full[S.EX_TIMESTAMP][full[S.EX_USER_ID] == user])
        expected.update((int(user), int(t)) for t in ts[-3:])
    assert set(zip(train[S.EX_USER_ID].tolist(), train[S.EX_TIMESTAMP].tolist(), strict=True)) == expected
    dropped = len(full[S.EX_USER_ID]) - len(train[S.EX_USER_ID])
    assert metadata["pipeline_counters"]["train_targets_dropped_max_targets"] == dropped
    # Item counts and sampling probabilities follow the kept targets only.
    counts = pd.read_csv(tmp_path / S.ITEM_COUNTS_FILE, sep="\t", header=None)[1]
    assert counts.sum() == len(train[S.EX_USER_ID]) == metadata["train_targets"]
    # The same requests (their item indices and sampling probabilities follow the new counts).
    np.testing.assert_array_equal(
        np.sort(parsed(tmp_path, S.SPLIT_EVAL)[S.EX_REQUEST_ID]), np.sort(examples[S.SPLIT_EVAL][S.EX_REQUEST_ID])
    )


def test_multi_process_run_gives_the_same_examples(small_raw, tmp_path, built):
    build(small_raw, tmp_path, "--direct_running_mode=multi_processing", "--direct_num_workers=2")
    for split in S.SPLITS:
        assert set(records(tmp_path, split)) == set(records(built, split)), split
    for name in S.VOCABULARIES:
        assert load_vocab(str(tmp_path), name) == load_vocab(str(built), name)


# --------------------------------------------------------------------------------------
# Exact values on a hand-made raw directory
# --------------------------------------------------------------------------------------
ADS = {  # item_id -> (advertiser, categories, confidences)
    101: (7, [10, 11], [0.9, 0.4]),
    102: (7, [12, 10, 13, 14, 15, 16, 17], [0.2, 0.8, 0.5, 0.1, 0.7, 0.05, 0.6]),  # > MAX_CATEGORIES
    103: (8, [13], [0.55]),
    104: (8, [14, 15], [0.3, 0.35]),
    105: (9, [16], [1.0]),
}
# subject id -> (categories, confidences, ad_id): 101 is the ad 101 (stated); 103 has an ad's id but
# is not an ad (ad_id null); 900 is not an ad
SUBJECTS = {101: ([20, 21], [0.6, 0.3], 101), 103: ([23], [0.7], None), 900: ([22], [0.9], None)}
LONG = [101, 102, 103, 104, 105, 102, 103]  # the long user's items, cycled
CUTOFF = T0 + 60 * 1000 + 1


def write_tiny_raw(raw: pathlib.Path) -> None:
    """User 1: 2 events; user 2: 70 events; user 3: a tie in timestamps; user 4: no events."""
    conversions = [(1, T0, 103, 8, "checkout"), (1, T0 + 100, 101, 7, "signup")]
    conversions += [
        (2, T0 + 1000 * i, LONG[i % len(LONG)], ADS[LONG[i % len(LONG)]][0], "add_to_cart") for i in range(70)
    ]
    conversions += [(3, T0, 105, 9, "lead"), (3, T0 + 50, 103, 8, "lead"), (3, T0 + 50, 102, 7, "lead")]
    rawio.write_table(str(raw), S.CONVERSIONS, pd.DataFrame(conversions, columns=list(S.CONVERSIONS.column_names)))
    rawio.write_table(
        str(raw),
        S.ITEMS,
        pd.DataFrame([(i, a, c, w) for i, (a, c, w) in ADS.items()], columns=list(S.ITEMS.column_names)),
    )
    rawio.write_table(
        str(raw),
        S.SUBJECT_ITEMS,
        pd.DataFrame(
            [(i, c, w, a) for i, (c, w, a) in SUBJECTS.items()], columns=list(S.SUBJECT_ITEMS.column_names)
        ).astype({S.AD_ID: "Int64"}),
    )
    rawio.write_table(
        str(raw),
        S.USERS,
        pd.DataFrame(
            [(1, "25-34", "US", None), (2, "35-44", "FR", "female"), (4, "18-24", "US", "male")],
            columns=list(S.USERS.column_names),
        ),
    )
    rawio.write_table(
        str(raw),
        S.REQUESTS,
        pd.DataFrame(
            [(1, 2, T0 + 65 * 1000 + 500, 101, 102), (2, 1, T0 + 200, 900, 105), (3, 3, T0 + 60, 103, 104)],
            columns=list(S.REQUESTS.column_names),
        ),
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[pathlib.Path, dict[str, dict[str, np.ndarray]]]:
    raw, out = tmp_path_factory.mktemp("tiny_raw"), tmp_path_factory.mktemp("tiny_data")
    write_tiny_raw(raw)
    build(raw, out, f"--cutoff={CUTOFF}", "--context_drop_prob=0", "--context_weight_jitter=0", "--num_shards=1")
    return out, {split: parsed(out, split) for split in S.SPLITS}


def _row(ex: dict[str, np.ndarray], user: int, ts: int) -> dict[str, np.ndarray]:
    (i,) = np.flatnonzero((ex[S.EX_USER_ID] == user) & (ex[S.EX_TIMESTAMP] == ts))
    return {name: values[i] for name, values in ex.items()}


def test_short_history_is_left_padded(tiny):
    out, ex = tiny
    items = Vocabulary(load_vocab(str(out), S.VOCAB_ITEM))
    first = _row(ex[S.SPLIT_TRAIN], 1, T0)
    assert first[S.HISTORY_LENGTH] == 0 and not first[S.HISTORY_ITEM].any() and not first[S.HISTORY_TIME_GAP].any()
    second = _row(ex[S.SPLIT_TRAIN], 1, T0 + 100)
    assert second[S.HISTORY_LENGTH] == 1
    np.testing.assert_array_equal(second[S.HISTORY_ITEM], [0] * (S.MAX_HISTORY - 1) + [items.index(103)])
    np.testing.assert_array_equal(second[S.HISTORY_TIME_GAP], [0] * (S.MAX_HISTORY - 1) + [S.time_gap_bucket(100)])
    advertisers = Vocabulary(load_vocab(str(out), S.VOCAB_ADVERTISER))
    event_types = Vocabulary(load_vocab(str(out), S.VOCAB_EVENT_TYPE))
    assert second[S.HISTORY_ADVERTISER][-1] == advertisers.index(8)
    assert second[S.HISTORY_EVENT_TYPE][-1] == event_types.index("checkout")
    assert second[S.LABEL_ITEM] == items.index(101)
    mask = dataset.history_mask(np.stack([first[S.HISTORY_LENGTH], second[S.HISTORY_LENGTH]])).numpy()
    assert mask.sum() == 1 and mask[1, -1]
    # Missing gender -> PAD_ID, known country -> its index.
    assert second[S.USER_GENDER] == S.PAD_ID
    assert second[S.USER_COUNTRY] == Vocabulary(load_vocab(str(out), S.VOCAB_COUNTRY)).index("US")


def test_long_history_keeps_the_last_events(tiny):
    out, ex = tiny
    items = Vocabulary(load_vocab(str(out), S.VOCAB_ITEM))
    train = ex[S.SPLIT_TRAIN]
    assert sorted(train[S.EX_TIMESTAMP][train[S.EX_USER_ID] == 2]) == [T0 + 1000 * i for i in range(61)]
    row = _row(train, 2, T0 + 60 * 1000)
    assert row[S.HISTORY_LENGTH] == S.MAX_HISTORY
    expected = [items.index(LONG[i % len(LONG)]) for i in range(10, 60)]
    np.testing.assert_array_equal(row[S.HISTORY_ITEM], expected)
    gaps = [S.time_gap_bucket(1000 * (60 - i)) for i in range(10, 60)]
    np.testing.assert_array_equal(row[S.HISTORY_TIME_GAP], gaps)
    row = _row(train, 2, T0 + 5 * 1000)
    assert row[S.HISTORY_LENGTH] == 5
    np.testing.assert_array_equal(row[S.HISTORY_ITEM][: S.MAX_HISTORY - 5], 0)
    np.testing.assert_array_equal(row[S.HISTORY_ITEM][-5:], [items.index(LONG[i]) for i in range(5)])
    mask = dataset.history_mask(row[S.HISTORY_LENGTH][None]).numpy()[0]
    np.testing.assert_array_equal(mask, np.arange(S.MAX_HISTORY) >= S.MAX_HISTORY - 5)


def test_equal_timestamps_are_not_each_others_history(tiny):
    out, ex = tiny
    items = Vocabulary(load_vocab(str(out), S.VOCAB_ITEM))
    train = ex[S.SPLIT_TRAIN]
    tied = np.flatnonzero((train[S.EX_USER_ID] == 3) & (train[S.EX_TIMESTAMP] == T0 + 50))
    assert len(tied) == 2
    for i in tied:
        assert train[S.HISTORY_LENGTH][i] == 1 and train[S.HISTORY_ITEM][i][-1] == items.index(105)


def test_label_top_categories_and_exact_context(tiny):
    out, ex = tiny
    categories = Vocabulary(load_vocab(str(out), S.VOCAB_CATEGORY))
    row = _row(ex[S.SPLIT_TRAIN], 2, T0 + 1000)  # label 102: 7 categories, the top 5 by confidence
    expected = [categories.index(c) for c in (10, 15, 17, 13, 12)]
    np.testing.assert_array_equal(row[S.LABEL_CATEGORIES], expected)
    np.testing.assert_allclose(row[S.LABEL_CONFIDENCES], [0.8, 0.7, 0.6, 0.5, 0.2])
    np.testing.assert_array_equal(row[S.CONTEXT_CATEGORIES], expected)  # no drop, no jitter
    np.testing.assert_array_equal(row[S.CONTEXT_WEIGHTS], row[S.LABEL_CONFIDENCES])


def test_eval_request_uses_the_subject_and_holds_its_conversions_out(tiny):
    out, ex = tiny
    items = Vocabulary(load_vocab(str(out), S.VOCAB_ITEM))
    categories = Vocabulary(load_vocab(str(out), S.VOCAB_CATEGORY))
    assert ex[S.SPLIT_EVAL][S.EX_REQUEST_ID].tolist() == [1]
    row = _row(ex[S.SPLIT_EVAL], 2, T0 + 65 * 1000 + 500)
    assert row[S.SUBJECT_ITEM] == items.index(101) and row[S.LABEL_ITEM] == items.index(102)
    np.testing.assert_array_equal(
        row[S.CONTEXT_CATEGORIES], S.pad_right([categories.index(20), categories.index(21)], S.MAX_CATEGORIES)
    )
    np.testing.assert_allclose(row[S.CONTEXT_WEIGHTS], [0.6, 0.3, 0, 0, 0])
    kept = [i for i in range(66) if LONG[i % len(LONG)] != 101][-S.MAX_HISTORY :]  # events 0..65, minus item 101
    np.testing.assert_array_equal(row[S.HISTORY_ITEM], [items.index(LONG[i % len(LONG)]) for i in kept])
    assert items.index(101) not in row[S.HISTORY_ITEM]
    # A request before the cutoff, whose subject is not an ad: train_requests, subject_item = PAD.
    row = _row(ex[S.SPLIT_TRAIN_REQUESTS], 1, T0 + 200)
    assert row[S.SUBJECT_ITEM] == S.PAD_ID and row[S.EX_REQUEST_ID] == 2 and row[S.HISTORY_LENGTH] == 2


def test_a_subject_id_equal_to_an_ad_id_is_not_that_ad_unless_ad_id_says_so(tiny):
    """Subject 103 shares its id with the ad 103 but its ad_id is null: not an ad, so no subject index
    and the user's conversion of the ad 103 stays in the history (only a subject ad's event is held out)."""
    out, ex = tiny
    items = Vocabulary(load_vocab(str(out), S.VOCAB_ITEM))
    row = _row(ex[S.SPLIT_TRAIN_REQUESTS], 3, T0 + 60)
    assert row[S.EX_REQUEST_ID] == 3 and row[S.SUBJECT_ITEM] == S.PAD_ID
    assert row[S.HISTORY_LENGTH] == 3 and items.index(103) in row[S.HISTORY_ITEM]


def test_users_and_metadata_of_the_tiny_run(tiny):
    out, ex = tiny
    metadata = dataset.load_metadata(str(out))
    assert metadata["cutoff_timestamp"] == CUTOFF
    assert metadata["counts"] == {
        S.SPLIT_TRAIN: 2 + 61 + 3,
        S.SPLIT_TRAIN_REQUESTS: 2,
        S.SPLIT_EVAL: 1,
        S.SPLIT_TRAIN_SEQUENCES: 1 + 2 + 1,
    }
    counters = metadata["pipeline_counters"]
    assert counters["users"] == 3 and counters["users_without_events"] == 1 and counters["users_without_users_row"] == 1
    assert _row(ex[S.SPLIT_TRAIN], 3, T0)[S.USER_AGE_BUCKET] == S.PAD_ID  # no users row: all missing


# --------------------------------------------------------------------------------------
# Dead letters
# --------------------------------------------------------------------------------------
def _jsonl(path: pathlib.Path, lines: list) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "part-0.jsonl").write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))


def test_malformed_rows_reach_the_dead_letter_output(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    conv = {S.USER_ID: 1, S.TIMESTAMP: T0, S.ITEM_ID: 101, S.ADVERTISER_ID: 7, S.EVENT_TYPE: "checkout"}
    good = [dict(conv, **{S.TIMESTAMP: T0 + 10 * i}) for i in range(5)] + [dict(conv, **{S.USER_ID: 2})]
    bad = [
        dict(conv, **{S.USER_ID: "abc"}),  # wrong type
        dict(conv, **{S.ITEM_ID: 999}),  # unknown item
        dict(conv, **{S.TIMESTAMP: 12}),  # out of range
        {k: v for k, v in conv.items() if k != S.EVENT_TYPE},  # missing column
        "{not json",
    ]
    _jsonl(raw / S.CONVERSIONS.name, good[:3] + bad + good[3:])
    item = {S.ITEM_ID: 101, S.ADVERTISER_ID: 7, S.CATEGORIES: [10, 11], S.CONFIDENCES: [0.9, 0.4]}
    _jsonl(
        raw / S.ITEMS.name,
        [
            item,
            dict(item, **{S.ITEM_ID: 102}),
            dict(item, **{S.ITEM_ID: 103, S.CONFIDENCES: [0.9]}),
            dict(item, **{S.ITEM_ID: 104, S.CONFIDENCES: [0.9, 1.5]}),
            dict(item, **{S.ADVERTISER_ID: 8}),
        ],
    )
    _jsonl(raw / S.SUBJECT_ITEMS.name, [{S.ITEM_ID: 900, S.CATEGORIES: [10], S.CONFIDENCES: [0.5]}])
    _jsonl(
        raw / S.USERS.name,
        [
            {S.USER_ID: 1, S.AGE_BUCKET: "25-34", S.COUNTRY: None, S.GENDER: "male"},
            {S.USER_ID: 2, S.AGE_BUCKET: 34, S.COUNTRY: "US", S.GENDER: "male"},
        ],
    )
    request = {S.REQUEST_ID: 1, S.USER_ID: 1, S.TIMESTAMP: T0 + 1000, S.SUBJECT_ITEM_ID: 900, S.ITEM_ID: 102}
    _jsonl(raw / S.REQUESTS.name, [request, dict(request, **{S.REQUEST_ID: 2, S.SUBJECT_ITEM_ID: 5})])

    metadata = build(raw, out, f"--cutoff={T0 + 500}")
    assert metadata["dead_letter"] == {
        S.CONVERSIONS.name: 5,
        S.ITEMS.name: 3,
        S.USERS.name: 1,
        S.SUBJECT_ITEMS.name: 0,
        S.REQUESTS.name: 1,
    }
    assert metadata["counts"] == {
        S.SPLIT_TRAIN: 6,
        S.SPLIT_TRAIN_REQUESTS: 0,
        S.SPLIT_EVAL: 1,
        S.SPLIT_TRAIN_SEQUENCES: 2,
    }
    letters = {}
    for name in S.RAW_TABLES:
        files = glob.glob(str(out / DEAD_LETTER_DIR / f"{name}-*.jsonl"))
        assert files, name
        letters[name] = [json.loads(line) for f in files for line in pathlib.Path(f).read_text().splitlines()]
        assert all(set(d) == {"table", "reason", "row"} and d["table"] == name for d in letters[name])
    reasons = sorted(d["reason"] for d in letters[S.CONVERSIONS.name])
    assert any("column 'user_id'" in r and "'abc'" in r for r in reasons)
    assert any("unknown id 999" in r for r in reasons)
    assert any("timestamp 12 out of range" in r for r in reasons)
    assert any("column 'event_type': missing" in r for r in reasons)
    assert any(r.startswith("unparseable row") for r in reasons)
    item_reasons = {d["row"][S.ITEM_ID]: d["reason"] for d in letters[S.ITEMS.name]}
    assert sorted(item_reasons) == [101, 103, 104]
    assert "column 'confidences'" in item_reasons[103] and "column 'confidences'" in item_reasons[104]
    assert "duplicate key" in item_reasons[101]
    assert "unknown id 5" in letters[S.REQUESTS.name][0]["reason"]
    # Users: the bad row is dead-lettered, its user keeps their events (demographics missing).
    train = parsed(out, S.SPLIT_TRAIN)
    assert (train[S.USER_AGE_BUCKET][train[S.EX_USER_ID] == 2] == S.PAD_ID).all()
    assert load_vocab(str(out), S.VOCAB_ITEM) == ["101", "102"]


def test_typed_parquet_fast_path_matches_row_by_row_validation():
    """The vectorised check of typed Arrow batches gives exactly what row_problem gives row by row."""
    n = 40
    rng = np.random.default_rng(0)
    schema = pa.schema([pa.field(f.name, f.type, nullable=True) for f in S.CONVERSIONS.arrow_schema()])
    ts = (T0 + rng.integers(0, 1000, n)).tolist()
    ts[3], ts[4] = 5, S.MAX_TIMESTAMP
    users = rng.integers(1, 5, n).tolist()
    users[7] = None
    items = rng.choice([101, 102, 103], n).tolist()
    items[9], items[11] = 999, None
    etypes = rng.choice(list(S.EVENT_TYPES), n).tolist()
    etypes[13] = None
    batch = pa.RecordBatch.from_pydict(
        {
            S.USER_ID: users,
            S.TIMESTAMP: ts,
            S.ITEM_ID: items,
            S.ADVERTISER_ID: rng.integers(1, 9, n).tolist(),
            S.EVENT_TYPE: etypes,
        },
        schema=schema,
    )
    known = KnownIds.of({S.ITEMS.name: [101, 102, 103], S.SUBJECT_ITEMS.name: [900]})
    assert typed_suspects(S.CONVERSIONS, batch, known) is not None
    fast_blocks, fast_dead, _ = validate_event_chunk(S.CONVERSIONS, batch, known)
    slow_blocks, slow_dead, _ = validate_event_chunk(S.CONVERSIONS, batch.to_pylist(), known)
    assert len(fast_dead) == 6
    assert sorted(map(json.dumps, fast_dead)) == sorted(map(json.dumps, slow_dead))
    assert [u for u, _ in fast_blocks] == [u for u, _ in slow_blocks]
    for (_, a), (_, b) in zip(fast_blocks, slow_blocks, strict=True):
        fa, fb = T.UserEvents.from_blocks([T.unpack_block(a)]), T.UserEvents.from_blocks([T.unpack_block(b)])
        for field in ("timestamp", "item", "advertiser", "event_type"):
            np.testing.assert_array_equal(getattr(fa, field), getattr(fb, field))


# --------------------------------------------------------------------------------------
# The numpy example builder and the wire encoder
# --------------------------------------------------------------------------------------
QUERIES = ["", "kube molla", "Ünïcode – query?", "x" * 300, "a", "b c", "zeta pol!"]


@pytest.mark.parametrize(
    "features",
    [S.FEATURES, S.SEQUENCE_FEATURES, S.with_query(S.FEATURES)],
    ids=["per_target", "sequence", "with_query"],
)
def test_serialize_examples_is_byte_identical_to_tf_train_example(features):
    import tensorflow as tf

    rng = np.random.default_rng(1)
    n = 7
    columns = {}
    for name, f in features.items():
        shape = (n, *f.shape)
        if f.dtype == "int64":
            columns[name] = rng.integers(0, 2**40, shape) * (rng.random(shape) < 0.3) + rng.integers(0, 300, shape)
        elif f.dtype == "string":
            columns[name] = np.asarray(QUERIES, dtype=object)
        else:
            columns[name] = rng.random(shape).astype(np.float32)
    if S.EX_REQUEST_ID in columns:
        columns[S.EX_REQUEST_ID][:3] = -1
    blobs = serialize_examples(columns, features)
    assert len(blobs) == n
    numeric = {name: f for name, f in features.items() if f.dtype != "string"}
    for i, blob in enumerate(blobs):
        example = tf.train.Example()
        for name, f in features.items():
            target = example.features.feature[name]
            if f.dtype == "string":
                target.bytes_list.value.append(columns[name][i].encode())
                continue
            values = np.asarray(columns[name][i]).reshape(-1).tolist()
            (target.int64_list if f.dtype == "int64" else target.float_list).value.extend(values)
        if len(numeric) < len(features):
            # strings: a second `features` field after the numeric part, which the parser merges
            assert tf.train.Example.FromString(blob) == example
            assert blob.startswith(serialize_examples(columns, numeric)[i])
            continue
        assert blob == example.SerializeToString(deterministic=True)
    parsed_back = tf.io.parse_example(tf.constant(blobs), S.feature_spec(features))
    for name, f in features.items():
        got = parsed_back[name].numpy()
        if f.dtype == "string":
            assert [v.decode() for v in got] == QUERIES
        else:
            np.testing.assert_array_equal(got, np.asarray(columns[name]).astype(got.dtype).reshape(got.shape))
    assert serialize_examples({name: np.zeros((0, *f.shape)) for name, f in features.items()}, features) == []
    bad = {name: np.zeros((n, *f.shape)) for name, f in S.SEQUENCE_FEATURES.items()}
    bad[S.SEQ_LABEL_ITEM] = np.zeros(n)  # a per-target label where the sequence spec has one per position
    with pytest.raises(ValueError, match="values per example"):
        serialize_examples(bad, S.SEQUENCE_FEATURES)


# --------------------------------------------------------------------------------------
# Sequence examples (dense training)
# --------------------------------------------------------------------------------------
def test_sequence_windows_cover_every_target_exactly_once():
    L = S.MAX_HISTORY
    n = np.asarray([0, 1, L - 1, L, L + 1, 3 * L + 7])
    for stride in (1, 7, L // 2, L):
        rank, last, previous = T.sequence_windows(n, stride)
        for r, count in enumerate(n.tolist()):
            mine = rank == r
            labelled = np.concatenate(
                [np.arange(p + 1, b + 1) for b, p in zip(last[mine], previous[mine], strict=True)] or [[]]
            )
            np.testing.assert_array_equal(labelled, np.arange(count))  # each target once, in order
            assert (last[mine] - np.maximum(previous[mine], 0) <= max(stride, L)).all()
            # a target of a later window sees at least L - stride earlier inputs of its window
            for b, p in zip(last[mine][1:], previous[mine][1:], strict=True):
                assert L - 1 - (b - (p + 1)) >= L - stride
    with pytest.raises(ValueError, match="stride"):
        T.sequence_windows(n, 0)


def test_sequence_examples_hold_every_target_once_and_never_leak(built, small_raw, examples, metadata):
    """Real TFRecords of the real pipeline: each position's inputs are exactly its user's earlier events."""
    cutoff = metadata["cutoff_timestamp"]
    seq, train = examples[S.SPLIT_TRAIN_SEQUENCES], examples[S.SPLIT_TRAIN]
    labelled = seq[S.SEQ_LABEL_ITEM] != S.PAD_ID
    assert labelled.sum() == metadata["train_sequence_targets"] == len(train[S.EX_USER_ID])  # no cap, no repeats
    assert (seq[S.SEQ_LABEL_TIMESTAMP][labelled] < cutoff).all()
    item_vocab = Vocabulary(load_vocab(str(built), S.VOCAB_ITEM))
    events = sorted_events(small_raw)
    seen = set()
    for w in range(len(seq[S.EX_USER_ID])):
        user = int(seq[S.EX_USER_ID][w])
        frame = events[user]
        ts = frame[S.TIMESTAMP].to_numpy()
        items = item_vocab.indices(frame[S.ITEM_ID].tolist())
        length = int(seq[S.HISTORY_LENGTH][w])
        first = S.MAX_HISTORY - length  # first input position
        for q in np.flatnonzero(labelled[w]):
            t_item, t_ts = seq[S.SEQ_LABEL_ITEM][w, q], seq[S.SEQ_LABEL_TIMESTAMP][w, q]
            (t,) = [i for i in np.flatnonzero((ts == t_ts) & (items == t_item)) if (user, i) not in seen][:1]
            seen.add((user, t))
            visible = q - first + 1  # inputs at positions <= q
            assert visible >= 0 and visible <= t
            # inputs up to q: the user's `visible` events just before the target, nothing at or after it
            np.testing.assert_array_equal(seq[S.HISTORY_ITEM][w, first : q + 1], items[t - visible : t])
            assert not seq[S.HISTORY_ITEM][w, :first].any()
            if visible:  # the newest visible input's gap: to its next event, this target
                assert seq[S.HISTORY_TIME_GAP][w, q] == S.time_gap_bucket(int(t_ts - ts[t - 1]))
            if q + 1 < S.MAX_HISTORY:  # the next position's input is this target
                assert seq[S.HISTORY_ITEM][w, q + 1] == t_item
            # the same target's per-target example: the same label features and synthetic context
            (i,) = np.flatnonzero(
                (train[S.EX_USER_ID] == user) & (train[S.EX_TIMESTAMP] == t_ts) & (train[S.LABEL_ITEM] == t_item)
            )[:1]
            for name, per_target in S.SEQ_TARGET_FEATURES.items():
                np.testing.assert_array_equal(seq[name][w, q], train[per_target][i])
        assert not seq[S.SEQ_CONTEXT_WEIGHTS][w][~labelled[w]].any()
    assert len(seen) == len(train[S.EX_USER_ID])


def test_history_next_gap_is_the_gap_to_the_next_event(built, small_raw, examples):
    ex = examples[S.SPLIT_TRAIN]
    events = sorted_events(small_raw)
    for i in range(0, len(ex[S.EX_USER_ID]), 97):
        n = int(ex[S.HISTORY_LENGTH][i])
        if n < 2:
            continue
        frame = events[int(ex[S.EX_USER_ID][i])]
        ts = frame[S.TIMESTAMP].to_numpy()
        before = ts[ts < ex[S.EX_TIMESTAMP][i]][-n:]
        expected = T.time_gap_buckets(np.r_[before[1:], ex[S.EX_TIMESTAMP][i]] - before)
        np.testing.assert_array_equal(ex[S.HISTORY_NEXT_GAP][i, -n:], expected)
        assert not ex[S.HISTORY_NEXT_GAP][i, :-n].any()


def test_eval_consumed_lists_every_ad_converted_before_each_eval_request(built, small_raw, examples):
    rows = []
    for path in glob.glob(str(built / S.EVAL_CONSUMED_DIR / "part*")):
        with open(path) as f:
            rows += [json.loads(line) for line in f]
    consumed = {r[S.REQUEST_ID]: r[S.CONSUMED_ITEMS] for r in rows}
    ev = examples[S.SPLIT_EVAL]
    assert sorted(consumed) == sorted(ev[S.EX_REQUEST_ID].tolist())
    item_vocab = Vocabulary(load_vocab(str(built), S.VOCAB_ITEM))
    events = sorted_events(small_raw)
    longer = 0
    for i in range(len(ev[S.EX_USER_ID])):
        frame = events.get(int(ev[S.EX_USER_ID][i]))
        before = [] if frame is None else frame[frame[S.TIMESTAMP] < ev[S.EX_TIMESTAMP][i]][S.ITEM_ID].tolist()
        expected = sorted(set(item_vocab.indices(before).tolist()))
        assert consumed[int(ev[S.EX_REQUEST_ID][i])] == expected
        longer += len(before) > S.MAX_HISTORY
    assert longer  # some users have more than the kept history: the rule needs the full set


def test_time_gap_buckets_match_the_schema():
    gaps = np.asarray([-5, 0, 1, 59, 60, 61, 600, 3601, 86400, 90 * 86400, 90 * 86400 + 1, 10**9])
    np.testing.assert_array_equal(T.time_gap_buckets(gaps), [S.time_gap_bucket(int(g)) for g in gaps])


def test_stable_keys_are_deterministic_and_distinct():
    ts, items = np.asarray([T0, T0, T0 + 1]), np.asarray([5, 6, 5])
    a = T.stable_keys(3, 42, ts, items)
    np.testing.assert_array_equal(a, T.stable_keys(3, 42, ts, items))
    assert len(set(a.tolist())) == 3
    assert not np.array_equal(a, T.stable_keys(4, 42, ts, items))
    u = T.stable_uniform(T.stable_keys(0, 1, np.arange(20000) + T0, np.zeros(20000, dtype=np.int64)), 0, 5)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01


def test_history_at_for_user_encoding(tiny):
    out, _ = tiny
    vocabularies = load_vocabularies(str(out))
    events = T.UserEvents(
        np.asarray([T0, T0 + 100]), np.asarray([103, 101]), np.asarray([8, 7]), np.asarray(["checkout", "signup"])
    )
    history = T.history_at(events, vocabularies, T0 + 3700)
    assert history[S.HISTORY_LENGTH] == 2
    items = vocabularies[S.VOCAB_ITEM]
    np.testing.assert_array_equal(history[S.HISTORY_ITEM][-2:], [items.index(103), items.index(101)])
    np.testing.assert_array_equal(history[S.HISTORY_TIME_GAP][-2:], [S.time_gap_bucket(3700), S.time_gap_bucket(3600)])
    assert not history[S.HISTORY_ITEM][:-2].any()
    excluded = T.history_at(events, vocabularies, T0 + 3700, exclude_item=101)
    assert excluded[S.HISTORY_LENGTH] == 1 and excluded[S.HISTORY_ITEM][-1] == items.index(103)
    assert T.encode_demographics(vocabularies, {S.COUNTRY: "US", S.GENDER: "nope"}) == {
        S.USER_AGE_BUCKET: S.PAD_ID,
        S.USER_COUNTRY: vocabularies[S.VOCAB_COUNTRY].index("US"),
        S.USER_GENDER: S.OOV_ID,
    }


# --------------------------------------------------------------------------------------
# The search surface: category names (synthetic training queries) and the search log
# --------------------------------------------------------------------------------------
NAMES = {10: "Kube", 11: "vupo tesa", 12: "molla", 13: "rana", 16: "zeta pol"}  # 14, 15, 17: no name
SEARCHES = [  # (request_id, user, timestamp, query, item): two before the cutoff, two at/after it
    (1, 2, T0 + 30 * 1000 + 500, "Kube molla?", 103),
    (2, 2, T0 + 64 * 1000, "vupo", 105),  # user 2 converted at exactly this time: not history
    (3, 1, T0 + 100, "tesa", 104),  # user 1 converted at T0 + 100 too
    (4, 4, T0 + 70 * 1000, "x", 101),  # user 4: no conversion at all
]
BAD_SEARCHES = [
    {S.REQUEST_ID: 1, S.USER_ID: 2, S.TIMESTAMP: T0 + 5, S.QUERY: "dup", S.ITEM_ID: 105},  # duplicate id
    {S.REQUEST_ID: 5, S.USER_ID: 1, S.TIMESTAMP: T0 + 10, S.QUERY: "a", S.ITEM_ID: 999},  # unknown ad
    {S.REQUEST_ID: 6, S.USER_ID: 1, S.TIMESTAMP: 12, S.QUERY: "a", S.ITEM_ID: 101},  # time out of range
    {S.REQUEST_ID: 7, S.USER_ID: 1, S.TIMESTAMP: T0 + 10, S.ITEM_ID: 101},  # no query
]
TINY_FLAGS = (f"--cutoff={CUTOFF}", "--context_drop_prob=0", "--context_weight_jitter=0", "--num_shards=1")


def parsed_with_query(data_dir: pathlib.Path, split: str) -> dict[str, np.ndarray]:
    """Every example of a split parsed with ``with_query(FEATURES)`` (a missing query reads as "")."""
    import tensorflow as tf

    blobs = records(data_dir, split)
    spec = S.feature_spec(S.with_query(S.FEATURES))
    return {k: v.numpy() for k, v in tf.io.parse_example(tf.constant(blobs, tf.string), spec).items()}


def without_query(blob: bytes) -> bytes:
    import tensorflow as tf

    example = tf.train.Example.FromString(blob)
    del example.features.feature[S.CONTEXT_QUERY]
    return example.SerializeToString(deterministic=True)


@pytest.fixture(scope="module")
def searched(tmp_path_factory, tiny) -> dict[str, pathlib.Path]:
    """The tiny raw data plus a search log (with bad rows), with and without the taxonomy's names."""
    out = {}
    for name, with_names in (("names", True), ("no_names", False)):
        raw, data = tmp_path_factory.mktemp(f"search_raw_{name}"), tmp_path_factory.mktemp(f"search_data_{name}")
        write_tiny_raw(raw)
        good = [dict(zip(S.SEARCH_REQUESTS.column_names, row, strict=True)) for row in SEARCHES]
        _jsonl(raw / S.SEARCH_REQUESTS.name, [*good[:2], *BAD_SEARCHES, *good[2:]])
        if with_names:
            names = pd.DataFrame(list(NAMES.items()), columns=list(S.CATEGORY_NAMES.column_names))
            rawio.write_table(str(raw), S.CATEGORY_NAMES, names)
        build(raw, data, *TINY_FLAGS)
        out[name] = data
    return out


def test_search_requests_become_examples_with_the_typed_query_and_a_strict_history(searched):
    out = searched["names"]
    items = Vocabulary(load_vocab(str(out), S.VOCAB_ITEM))
    train, held = parsed_with_query(out, S.SPLIT_TRAIN_SEARCH), parsed_with_query(out, S.SPLIT_EVAL_SEARCH)
    assert sorted(train[S.EX_REQUEST_ID].tolist()) == [1, 3] and sorted(held[S.EX_REQUEST_ID].tolist()) == [2, 4]
    by_id = {}
    for ex in (train, held):
        for i, request_id in enumerate(ex[S.EX_REQUEST_ID].tolist()):
            by_id[request_id] = {name: values[i] for name, values in ex.items()}
    for request_id, user, ts, query, item in SEARCHES:
        row = by_id[request_id]
        assert row[S.CONTEXT_QUERY].decode() == query  # as typed: case and punctuation kept
        assert row[S.EX_USER_ID] == user and row[S.EX_TIMESTAMP] == ts
        assert row[S.LABEL_ITEM] == items.index(item) and row[S.SUBJECT_ITEM] == S.PAD_ID
        assert (row[S.CONTEXT_CATEGORIES] == S.PAD_ID).all() and (row[S.CONTEXT_WEIGHTS] == 0).all()
    # histories: the conversions strictly before the request (user 2 converts every 1000 s from T0)
    assert by_id[1][S.HISTORY_LENGTH] == 31
    row = by_id[2]
    np.testing.assert_array_equal(row[S.HISTORY_ITEM], [items.index(LONG[i % len(LONG)]) for i in range(14, 64)])
    assert by_id[3][S.HISTORY_LENGTH] == 1 and by_id[3][S.HISTORY_ITEM][-1] == items.index(103)
    assert by_id[4][S.HISTORY_LENGTH] == 0
    consumed = {}
    for f in glob.glob(str(out / S.EVAL_SEARCH_CONSUMED_DIR / "part-*.jsonl")):
        for line in pathlib.Path(f).read_text().splitlines():
            d = json.loads(line)
            consumed[d[S.REQUEST_ID]] = d[S.CONSUMED_ITEMS]
    assert consumed == {2: sorted(items.index(i) for i in set(LONG)), 4: []}


def test_bad_search_rows_reach_the_dead_letter_output_and_every_row_is_counted(searched):
    out = searched["names"]
    metadata = dataset.load_metadata(str(out))
    assert metadata["optional_tables"] == [S.SEARCH_REQUESTS.name, S.CATEGORY_NAMES.name]
    assert metadata["dead_letter"][S.SEARCH_REQUESTS.name] == len(BAD_SEARCHES)
    assert metadata["rows"][S.SEARCH_REQUESTS.name] == len(SEARCHES)
    assert metadata["rows"][S.CATEGORY_NAMES.name] == len(NAMES) and metadata["dead_letter"][S.CATEGORY_NAMES.name] == 0
    assert metadata["counts"][S.SPLIT_TRAIN_SEARCH] == 2 and metadata["counts"][S.SPLIT_EVAL_SEARCH] == 2
    files = glob.glob(str(out / DEAD_LETTER_DIR / f"{S.SEARCH_REQUESTS.name}-*.jsonl"))
    reasons = sorted(json.loads(line)["reason"] for f in files for line in pathlib.Path(f).read_text().splitlines())
    assert len(reasons) == 4
    assert any("duplicate key" in r for r in reasons) and any("unknown id 999" in r for r in reasons)
    assert any("timestamp 12 out of range" in r for r in reasons)
    assert any("column 'query': missing" in r for r in reasons)


def test_train_queries_come_from_the_label_s_confident_category_names_deterministically(searched, tiny):
    from tfrs_ctx.data.search_context import category_name_table, synthetic_queries

    out = searched["names"]
    train = parsed_with_query(out, S.SPLIT_TRAIN)
    items, categories = load_vocab(str(out), S.VOCAB_ITEM), load_vocab(str(out), S.VOCAB_CATEGORY)
    raw_item = np.asarray([int(items[i - S.NUM_RESERVED_IDS]) for i in train[S.LABEL_ITEM]])
    names = category_name_table([None, None, *map(int, categories)], NAMES)
    keys = T.stable_keys(0, train[S.EX_USER_ID], train[S.EX_TIMESTAMP], raw_item)
    expected = synthetic_queries(train[S.LABEL_CATEGORIES], train[S.LABEL_CONFIDENCES], names, keys)
    queries = [q.decode() for q in train[S.CONTEXT_QUERY]]
    assert queries == expected.tolist()
    confident = {  # label ad -> the words of its categories of confidence >= 0.3 that have a name
        101: {"kube", "vupo", "tesa"},
        102: {"kube", "rana"},  # molla (12) is one of its top-5 but at 0.2
        103: {"rana"},
        104: set(),
        105: {"zeta", "pol"},
    }
    for item, query in zip(raw_item.tolist(), queries, strict=True):
        allowed = confident[item]
        assert (query == "") == (not allowed)
        for w in query.split():  # a word is a name's word, or a one-letter edit of one (typo)
            assert w in allowed or any(w[0] == a[0] and w[-1] == a[-1] and abs(len(w) - len(a)) <= 1 for a in allowed)
    # the query is the only change: every split is the no-names build's, byte for byte, once the query is removed
    base, _ = tiny
    assert sorted(map(without_query, records(out, S.SPLIT_TRAIN))) == sorted(records(base, S.SPLIT_TRAIN))
    for split in (S.SPLIT_TRAIN_REQUESTS, S.SPLIT_EVAL, S.SPLIT_TRAIN_SEQUENCES):
        assert sorted(records(out, split)) == sorted(records(base, split)), split


def test_without_names_or_search_log_the_splits_are_exactly_today_s(searched, tiny):
    base, _ = tiny
    no_names = searched["no_names"]
    for split in S.SPLITS:  # a search log without names: the four splits byte-identical, no query anywhere
        assert sorted(records(no_names, split)) == sorted(records(base, split)), split
    assert (parsed_with_query(no_names, S.SPLIT_TRAIN)[S.CONTEXT_QUERY] == b"").all()
    assert len(records(no_names, S.SPLIT_EVAL_SEARCH)) == 2
    metadata = dataset.load_metadata(str(base))  # no search log: neither search split, no optional table
    assert set(metadata["counts"]) == set(S.SPLITS) and metadata["optional_tables"] == []
    assert not (base / S.SPLIT_EVAL_SEARCH).exists() and not (base / S.EVAL_SEARCH_CONSUMED_DIR).exists()
