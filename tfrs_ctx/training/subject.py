"""Training examples of the subject ad (``model.subject_embedding``), in the tf.data pipeline.

A request's subject ad is defined by the data; where it is the user's previous event
(``train.context_is_previous_event``: MovieLens, "label = an event, subject = the event before it,
held out of the history"), training builds the same thing from the training split: a share
``train.subject_share`` of the targets get their history's last event as the subject ad and a
history without it; the other targets have no subject ad, so the model also learns the
no-subject path. Nothing at or after the cutoff is read (only the training splits). With
``train.subject_real_context`` (default) a subject target's category context is the subject ad's
own categories, as in a request (the context *is* the previous event); without it, the target's
synthetic (label) categories stay. Measured on MovieLens: with the label's categories the context
path at trust 1 lost to no context on the derived requests (the categories dominate, and one trust
scales both blocks), so calibration kept trust 0.1 and the subject gained nothing.

* per target (``train`` split): :func:`with_example_subjects` shifts the chosen examples' histories
  right by one (the last event becomes ``subject_item``), as
  :func:`tfrs_ctx.training.calibrate.previous_event_request` does for one example;
* dense (``train_sequences``): :func:`with_sequence_subjects` gives a chosen target position ``q``
  the input at ``q`` as its subject and the state of position ``q - 1`` (the events before it),
  through the per-position inputs ``SEQ_SUBJECT_ITEM`` and ``SEQ_STATE_POSITION``. The one
  difference with a request: the state's last event's next-event gap is its gap to the subject
  event, where a request's history has its gap to the request.
"""

from __future__ import annotations

import tensorflow as tf

from tfrs_ctx import schema
from tfrs_ctx.models.two_tower import SEQ_STATE_POSITION, SEQ_SUBJECT_ITEM

_SHIFTED = (*schema.HISTORY_FEATURES, schema.HISTORY_NEXT_GAP)


def _chosen(shape: tf.Tensor, share: float, seed: int) -> tf.Tensor:
    return tf.random.uniform(shape, seed=seed) < share


Tables = tuple[tf.Tensor, tf.Tensor]  # the corpus's [items, C] categories and confidences (row = index - 2)


def corpus_tables(data_dir: str) -> Tables:
    """The ads' top categories and confidences, row ``r`` = ad index ``r + NUM_RESERVED_IDS``."""
    from tfrs_ctx.data import dataset

    corpus = dataset.load_corpus(data_dir)
    return tf.constant(corpus[schema.LABEL_CATEGORIES]), tf.constant(corpus[schema.LABEL_CONFIDENCES])


def _subject_context(tables: Tables, subject: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    rows = tf.maximum(subject - schema.NUM_RESERVED_IDS, 0)
    return tf.gather(tables[0], rows), tf.gather(tables[1], rows)


def with_example_subjects(
    features: dict[str, tf.Tensor], share: float, seed: int = 0, tables: Tables | None = None
) -> dict[str, tf.Tensor]:
    """A batch of per-target examples: a ``share`` of those with a history get its last event as the subject ad
    (and, with ``tables``, that ad's categories as their context)."""
    out = dict(features)
    length = tf.reshape(features[schema.HISTORY_LENGTH], [-1])
    chosen = _chosen(tf.shape(length), share, seed) & (length >= 1)
    rows = chosen[:, tf.newaxis]
    for name in _SHIFTED:
        if name not in features:
            continue
        values = features[name]
        shifted = tf.concat([tf.zeros_like(values[:, :1]), values[:, :-1]], axis=1)
        out[name] = tf.where(rows, shifted, values)
    if schema.HISTORY_NEXT_GAP in features:  # the new last event's next event is the target
        gaps = out[schema.HISTORY_NEXT_GAP]
        fixed = tf.concat([gaps[:, :-1], out[schema.HISTORY_TIME_GAP][:, -1:]], axis=1)
        out[schema.HISTORY_NEXT_GAP] = tf.where(rows, fixed, gaps)
    out[schema.HISTORY_LENGTH] = tf.where(chosen, length - 1, length)
    subject = features[schema.HISTORY_ITEM][:, -1]
    out[schema.SUBJECT_ITEM] = tf.where(chosen, subject, tf.zeros_like(subject))
    if tables is not None:
        cats, confs = _subject_context(tables, subject)
        out[schema.CONTEXT_CATEGORIES] = tf.where(rows, cats, features[schema.CONTEXT_CATEGORIES])
        out[schema.CONTEXT_WEIGHTS] = tf.where(rows, confs, features[schema.CONTEXT_WEIGHTS])
    return out


def with_sequence_subjects(
    features: dict[str, tf.Tensor], share: float, seed: int = 0, tables: Tables | None = None
) -> dict[str, tf.Tensor]:
    """A batch of windows: a ``share`` of the target positions ``q`` holding an input (``q >= 1``) get the
    input at ``q`` as their subject ad and position ``q - 1``'s state; the others keep their own state."""
    out = dict(features)
    labels = features[schema.SEQ_LABEL_ITEM]
    length = tf.shape(labels)[1]
    positions = tf.range(length, dtype=tf.int64)[tf.newaxis] + tf.zeros_like(labels)
    first = tf.cast(length, tf.int64) - tf.reshape(tf.cast(features[schema.HISTORY_LENGTH], tf.int64), [-1, 1])
    is_input = (positions >= first) & (positions >= 1)
    chosen = _chosen(tf.shape(labels), share, seed) & is_input & (labels != schema.PAD_ID)
    out[SEQ_STATE_POSITION] = tf.where(chosen, positions - 1, positions)
    out[SEQ_SUBJECT_ITEM] = tf.where(chosen, features[schema.HISTORY_ITEM], tf.zeros_like(labels))
    if tables is not None:  # the subject's own categories as the position's context
        cats, confs = _subject_context(tables, features[schema.HISTORY_ITEM])
        where = chosen[..., tf.newaxis]
        out[schema.SEQ_CONTEXT_CATEGORIES] = tf.where(where, cats, features[schema.SEQ_CONTEXT_CATEGORIES])
        out[schema.SEQ_CONTEXT_WEIGHTS] = tf.where(where, confs, features[schema.SEQ_CONTEXT_WEIGHTS])
    return out
