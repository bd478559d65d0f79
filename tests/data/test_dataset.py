"""tf.data reader (built from the schema alone) and vocabularies, on a real pipeline run."""

from __future__ import annotations

import pathlib
import pickle

import numpy as np
import pytest
import tensorflow as tf

from tfrs_ctx import schema as S
from tfrs_ctx.data import dataset
from tfrs_ctx.data.vocab import Vocabulary, load_vocab, vocab_sizes, write_vocab


@pytest.fixture(scope="module")
def data_dir(small_data) -> pathlib.Path:
    """The session's pipeline run on ``small_raw`` (conftest's ``small_data``)."""
    return small_data


def _ids(ds: tf.data.Dataset) -> list[tuple[int, int, int]]:
    return [
        (int(u), int(t), int(i))
        for b in ds
        for u, t, i in zip(b[S.EX_USER_ID].numpy(), b[S.EX_TIMESTAMP].numpy(), b[S.LABEL_ITEM].numpy(), strict=True)
    ]


def test_parse_examples_gives_every_schema_feature(data_dir):
    files = tf.io.gfile.glob(S.tfrecord_pattern(str(data_dir), S.SPLIT_EVAL))
    serialized = next(iter(tf.data.TFRecordDataset(files, compression_type="GZIP").batch(8)))
    parsed = dataset.parse_examples(serialized)
    assert set(parsed) == set(S.FEATURES)
    for name, feature in S.FEATURES.items():
        assert parsed[name].shape == (8, *feature.shape), name
        assert parsed[name].dtype == (tf.int64 if feature.dtype == "int64" else tf.float32), name


def test_make_dataset_is_deterministic_without_shuffle(data_dir):
    metadata = dataset.load_metadata(str(data_dir))
    ds = dataset.make_dataset(str(data_dir), S.SPLIT_TRAIN, batch_size=100)
    first, second = _ids(ds), _ids(ds)
    assert first == second and len(first) == metadata["counts"][S.SPLIT_TRAIN]
    sizes = [int(b[S.EX_USER_ID].shape[0]) for b in ds]
    assert sizes[:-1] == [100] * (len(sizes) - 1) and sizes[-1] <= 100
    dropped = dataset.make_dataset(str(data_dir), S.SPLIT_TRAIN, batch_size=100, drop_remainder=True)
    assert dropped.element_spec[S.HISTORY_ITEM].shape == (100, S.MAX_HISTORY)


def test_shuffle_is_seeded_and_repeat_goes_on(data_dir):
    plain = _ids(dataset.make_dataset(str(data_dir), S.SPLIT_EVAL, batch_size=32))
    shuffled = _ids(dataset.make_dataset(str(data_dir), S.SPLIT_EVAL, batch_size=32, shuffle=True, seed=3))
    assert sorted(shuffled) == sorted(plain) and shuffled != plain
    repeated = dataset.make_dataset(str(data_dir), S.SPLIT_EVAL, batch_size=32, repeat=True)
    assert sum(int(b[S.EX_USER_ID].shape[0]) for b in repeated.take(len(plain) // 32 + 3)) > len(plain)


def test_history_mask_marks_the_real_events_of_left_padded_histories():
    mask = dataset.history_mask(tf.constant([0, 1, 3, S.MAX_HISTORY], dtype=tf.int64)).numpy()
    assert mask.shape == (4, S.MAX_HISTORY) and mask.dtype == bool
    np.testing.assert_array_equal(mask.sum(axis=1), [0, 1, 3, S.MAX_HISTORY])
    np.testing.assert_array_equal(mask[2], np.arange(S.MAX_HISTORY) >= S.MAX_HISTORY - 3)
    np.testing.assert_array_equal(dataset.history_mask(tf.constant([[2]]), max_len=4).numpy(), [[0, 0, 1, 1]])


def test_masks_agree_with_the_padding_of_real_examples(data_dir):
    batch = next(iter(dataset.make_dataset(str(data_dir), S.SPLIT_TRAIN, batch_size=256)))
    mask = dataset.history_mask(batch[S.HISTORY_LENGTH]).numpy()
    for name in S.HISTORY_FEATURES:
        values = batch[name].numpy()
        assert (values[~mask] == S.PAD_ID).all() and (values[mask] != S.PAD_ID).all(), name


def test_metadata_and_corpus(data_dir):
    metadata = dataset.load_metadata(str(data_dir))
    assert metadata["vocab_sizes"] == vocab_sizes(str(data_dir))
    assert set(metadata["counts"]) == {*S.SPLITS, *S.SEARCH_SPLITS}  # the synthetic default has the search log
    corpus = dataset.load_corpus(str(data_dir))
    n = metadata["vocab_sizes"][S.VOCAB_ITEM] - S.NUM_RESERVED_IDS
    assert set(corpus) == {S.ITEM_ID, *S.CANDIDATE_FEATURES}
    for name in S.CANDIDATE_FEATURES:
        feature = S.FEATURES[name]
        assert corpus[name].shape == (n, *feature.shape)
        assert corpus[name].dtype == (np.int64 if feature.dtype == "int64" else np.float32)
    assert corpus[S.LABEL_CATEGORIES].max() < metadata["vocab_sizes"][S.VOCAB_CATEGORY]
    assert corpus[S.LABEL_ADVERTISER].min() >= S.NUM_RESERVED_IDS


def test_missing_split_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no TFRecords"):
        dataset.make_dataset(str(tmp_path), S.SPLIT_TRAIN, batch_size=4)


# --------------------------------------------------------------------------------------
# Vocabularies
# --------------------------------------------------------------------------------------
def test_vocab_round_trip_and_sizes(tmp_path):
    for name in S.VOCABULARIES:
        write_vocab(str(tmp_path), name, ["a", "b"] if name != S.VOCAB_ITEM else [30, 10, 20])
    assert load_vocab(str(tmp_path), S.VOCAB_ITEM) == ["30", "10", "20"]
    sizes = vocab_sizes(str(tmp_path))
    assert sizes[S.VOCAB_ITEM] == 3 + S.NUM_RESERVED_IDS and sizes[S.VOCAB_GENDER] == 2 + S.NUM_RESERVED_IDS
    for bad in (["a", ""], ["a\nb"], ["a", "a"]):
        with pytest.raises(ValueError):
            write_vocab(str(tmp_path), S.VOCAB_GENDER, bad)


def test_vocabulary_lookup_pad_and_oov():
    vocab = Vocabulary(["US", "FR"])
    assert vocab.index("US") == S.NUM_RESERVED_IDS and vocab.index("FR") == S.NUM_RESERVED_IDS + 1
    assert vocab.index("DE") == S.OOV_ID
    assert vocab.index(None) == vocab.index(float("nan")) == vocab.index(S.MISSING_STRING) == S.PAD_ID
    assert vocab.value(S.NUM_RESERVED_IDS + 1) == "FR" and vocab.value(S.OOV_ID) is None
    assert len(vocab) == 2 and vocab.size == 2 + S.NUM_RESERVED_IDS
    ids = Vocabulary(["30", "10", "20"])
    assert ids.index(10) == ids.index("10") == ids.index(10.0) == S.NUM_RESERVED_IDS + 1
    np.testing.assert_array_equal(ids.int_indices(np.asarray([20, 99, 30, 10])), [4, S.OOV_ID, 2, 3])
    np.testing.assert_array_equal(ids.indices([20, None, 7]), [4, S.PAD_ID, S.OOV_ID])
    restored = pickle.loads(pickle.dumps(ids))
    np.testing.assert_array_equal(restored.int_indices(np.asarray([20, 5])), [4, S.OOV_ID])
