"""The contextual sequential two-tower model (TFRS).

Query tower = ``head(encoder(history), context, demographics)``:

* ``encode_history``: summed event embeddings (ad, advertiser, event type, time gap) through
  a Transformer :class:`~tfrs_ctx.models.layers.SequenceEncoder`; its last valid hidden state is
  the vector the offline job stores in the feature store.
* ``head``: that vector (or a learned no-history vector when the history is empty), the
  :class:`~tfrs_ctx.models.layers.ContextLayer` output and demographic embeddings, concatenated,
  through the user MLP -> L2-normalised user embedding. With ``use_context=False`` the head
  has no context path at all: that is the sequence-only production baseline.

Candidate tower: ad id + advertiser + confidence-weighted interest categories -> MLP ->
L2-normalised ad embedding. Ad, advertiser and category embedding tables are shared by
both towers.

Loss (``model.loss=auto``): full softmax over the whole ad corpus when it has at most
``full_softmax_max_items`` ads; above that (or with ``model.loss=mixed``), mixed negatives (Yang et al.
2020): the batch's labels plus ``model.sampled_negatives`` corpus ads drawn per step (uniformly, or a
``sampled_popularity_share`` of them by popularity), shared by every query of the step, each column
corrected by the log of its expected count among the step's candidates (:class:`CorpusNegatives`),
accidental hits (the query's own label ad elsewhere) masked. ``model.loss=in_batch``: the batch's
labels only, logQ-corrected, accidental hits removed (``tfrs.tasks.Retrieval``). The
contextual model adds, with weight ``no_context_loss_weight``, the same loss for the same
examples with their context cleared: one history encoding, two heads. That keeps the
context-missing path (most requests in production) as good as the sequence-only baseline,
which dropping a share of contexts at random does not (see the ablation).

Dense training (``train.mode=dense``, batches of :data:`tfrs_ctx.schema.SEQUENCE_FEATURES`):
one causal pass over a window gives every position's state ``[B, L, d]``; the head runs per
position (its context, the user's demographics repeated, a position with an empty history gets
the no-history vector) and the same retrieval loss (full softmax, or in-batch / mixed logQ over the
batch's targets, the sampled ads shared by every position) and no-context loss run over every
position that holds a target (averaged over targets for the full softmax, summed for the sampled
losses); padding positions contribute nothing. The offline encoder and the served head are the
same functions as per target: the last valid state is what the feature store holds. Two optional
per-position inputs the training pipeline may add (:mod:`tfrs_ctx.training.dense`): the position
whose state scores a target (an earlier one, e.g. the last event strictly before the target's
timestamp) and each target's loss weight.

History time gaps (``model.time_gap``): ``to_target`` reads ``HISTORY_TIME_GAP``; ``next_event``
(dense training) reads ``HISTORY_NEXT_GAP`` where an example carries both (the per-target and
request splits), else ``HISTORY_TIME_GAP`` (sequence examples, and the exported signatures, whose
caller computes it in the model's semantics, as ``model_info.json`` says).

Under a distribution strategy (multi-worker training) each replica computes the loss of its share
of the global batch and the gradients are summed: the full softmax is scaled to the global mean
(:func:`global_mean`); TFRS's in-batch loss and the mixed loss are sums over the batch, which summed
over replicas is already the global sum, but each replica's in-batch negatives are its own share of the
batch only (``batch_size / replicas`` negatives per query instead of ``batch_size``); each replica
draws its own ``sampled_negatives`` corpus ads (as many per query as in one process).

The context layer's ``trust`` (the scale of its output, 1 in training) is chosen after
training on logged requests with their real context (``tfrs_ctx.training.calibrate``): how far real
context can be believed (at context strength 0: not at all -> lift ~1x).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs
import tf_keras as keras

from tfrs_ctx import schema
from tfrs_ctx.config import FUSION_CROSS_ATTENTION, ModelConfig
from tfrs_ctx.models.layers import (
    MLP,
    ContextLayer,
    CrossAttentionFusion,
    SequenceEncoder,
    mask_states,
    weighted_average,
)
from tfrs_ctx.models.query_encoder import QueryContextLayer
from tfrs_ctx.models.subject import SubjectLayer, subject_of

CORPUS_BLOCK = 262_144  # ads per eager candidate-tower call (corpus_embeddings)


def is_sequence_batch(features: dict[str, tf.Tensor]) -> bool:
    """A batch of sequence examples (dense training) rather than per-target examples."""
    return schema.SEQ_LABEL_ITEM in features


def position_history_length(length: tf.Tensor, max_length: tf.Tensor | int) -> tf.Tensor:
    """``[B, L]``: events a causal position of a left-padded history has seen (0 before the first)."""
    positions = tf.range(max_length, dtype=tf.int64)[tf.newaxis]
    first = tf.cast(max_length, tf.int64) - tf.cast(tf.reshape(length, [-1, 1]), tf.int64)
    return tf.maximum(positions - first + 1, 0)


# Optional per-position inputs of a batch of sequences, computed by the training input pipeline
# (:mod:`tfrs_ctx.training.dense`), never written to TFRecords:
# * SEQ_STATE_POSITION ``[B, L]`` int64: the position whose causal state a target position is scored from
#   (at most the position itself; absent: the position itself).
# * SEQ_TARGET_WEIGHT ``[B, L]`` float32: each target position's loss weight (absent: 1).
SEQ_STATE_POSITION = "seq_state_position"
SEQ_TARGET_WEIGHT = "seq_target_weight"
# * SEQ_SUBJECT_ITEM ``[B, L]`` int64: a target position's subject ad (model.subject_embedding;
#   :mod:`tfrs_ctx.training.subject`), PAD_ID where none.
SEQ_SUBJECT_ITEM = "seq_subject_item"
TARGET_WEIGHT = "target_weight"  # the per-target name of SEQ_TARGET_WEIGHT once a position is a target


def without_context(features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """The same examples with the context cleared (categories PAD, weights 0, no subject ad, no query)."""
    features = dict(features)
    features[schema.CONTEXT_CATEGORIES] = tf.zeros_like(features[schema.CONTEXT_CATEGORIES])
    features[schema.CONTEXT_WEIGHTS] = tf.zeros_like(features[schema.CONTEXT_WEIGHTS])
    if schema.SUBJECT_ITEM in features:
        features[schema.SUBJECT_ITEM] = tf.zeros_like(features[schema.SUBJECT_ITEM])
    if schema.CONTEXT_QUERY in features:
        features[schema.CONTEXT_QUERY] = no_query(features[schema.CONTEXT_QUERY])
    return features


def no_query(queries: tf.Tensor) -> tf.Tensor:
    """Empty queries of the same shape (the search surface's "no context")."""
    return tf.fill(tf.shape(queries), tf.constant("", tf.string))


def queries_of(features: dict[str, tf.Tensor], batch_of: tf.Tensor) -> tf.Tensor:
    """``[B]`` the batch's raw query strings ("" where the features carry none)."""
    if schema.CONTEXT_QUERY in features:
        return tf.reshape(features[schema.CONTEXT_QUERY], [-1])
    return tf.fill(tf.shape(batch_of)[:1], tf.constant("", tf.string))


def global_mean(per_example: tf.Tensor) -> tf.Tensor:
    """The mean over the *global* batch: this replica's sum / (its batch x replicas in sync).

    TFRS's ``train_step`` takes the gradient of ``compute_loss`` as it is and the optimizer sums
    gradients across replicas, so each replica's loss must be its share of the global mean for
    one worker and N workers to take the same step (and the logged loss, summed over replicas,
    is the global mean). Outside a strategy (one replica) it is the plain mean.
    """
    context = tf.distribute.get_replica_context()
    replicas = context.num_replicas_in_sync if context is not None else 1
    count = tf.cast(tf.shape(per_example)[0] * replicas, per_example.dtype)
    return tf.math.divide_no_nan(tf.reduce_sum(per_example), count)  # 0 with no target (dense: all padding)


LOSS_FULL_SOFTMAX, LOSS_IN_BATCH, LOSS_MIXED = "full_softmax", "in_batch", "mixed"


def resolve_loss(cfg: ModelConfig, num_ads: int) -> str:
    """``model.loss`` with ``auto`` resolved: full softmax up to ``full_softmax_max_items`` ads, else mixed."""
    if cfg.loss != "auto":
        return cfg.loss
    return LOSS_FULL_SOFTMAX if num_ads <= cfg.full_softmax_max_items else LOSS_MIXED


class CorpusNegatives:
    """Mixed negatives' second source: ``count`` corpus ads drawn per step, with replacement, shared by the batch.

    Each draw is uniform over the corpus, or with probability ``popularity_share`` by the ads'
    training popularity (``corpus[LABEL_SAMPLING_PROB]``, the same probability the examples carry).
    The logQ correction of every candidate column, in-batch or sampled, is the log of its expected
    count among all the step's candidates, ``B * p(ad) + count * q(ad)`` (the batch's ``B`` labels
    are draws from ``p``, the corpus draws from ``q``): the mixture's sampling probability, as in
    Yang et al. 2020 (mixed negative sampling). With ``count`` = 0 it is the in-batch correction.
    """

    def __init__(self, corpus: dict[str, np.ndarray], count: int, popularity_share: float):
        if schema.LABEL_SAMPLING_PROB not in corpus:
            raise ValueError(f"model.loss=mixed needs the ads' popularity: corpus[{schema.LABEL_SAMPLING_PROB!r}]")
        popularity = np.asarray(corpus[schema.LABEL_SAMPLING_PROB], dtype=np.float64)
        total = popularity.sum()
        popularity = popularity / total if total > 0 else np.full(len(popularity), 1.0 / max(1, len(popularity)))
        self.count, self.share, self.size = count, float(popularity_share), len(popularity)
        self.popularity = tf.constant(popularity, tf.float32)
        self.cdf = tf.constant(np.cumsum(popularity), tf.float32)
        self.q = tf.constant((1.0 - self.share) / self.size + self.share * popularity, tf.float32)
        # a label is an ad seen at least once: its p is at least the rarest seen ad's (never log 0)
        self.min_p = float(popularity[popularity > 0].min()) if (popularity > 0).any() else 1.0 / max(1, self.size)

    def sample(self) -> tf.Tensor:
        """``[count]`` corpus rows (row ``r`` = item-vocabulary index ``r + NUM_RESERVED_IDS``)."""
        rows = tf.random.uniform([self.count], 0, self.size, dtype=tf.int64)
        if self.share > 0:
            popular = tf.searchsorted(self.cdf, tf.random.uniform([self.count]), side="right", out_type=tf.int64)
            popular = tf.minimum(popular, self.size - 1)
            rows = tf.where(tf.random.uniform([self.count]) < self.share, popular, rows)
        return rows

    def expected_counts(self, ids: tf.Tensor, probability: tf.Tensor, rows: tf.Tensor) -> tf.Tensor:
        """``[B + count]``: each candidate's expected count among the step's (batch labels ``ids``, then ``rows``)."""
        batch = tf.cast(tf.shape(ids)[0], tf.float32)
        corpus_rows = tf.clip_by_value(ids - schema.NUM_RESERVED_IDS, 0, self.size - 1)
        labels = batch * tf.maximum(probability, self.min_p) + self.count * tf.gather(self.q, corpus_rows)
        sampled = batch * tf.gather(self.popularity, rows) + self.count * tf.gather(self.q, rows)
        return tf.concat([labels, sampled], axis=0)


def mixed_softmax_loss(
    queries: tf.Tensor,
    candidates: tf.Tensor,
    ids: tf.Tensor,
    log_counts: tf.Tensor,
    temperature: float,
    weights: tf.Tensor | None = None,
    positives: tf.Tensor | None = None,
) -> tf.Tensor:
    """The summed softmax loss of ``B`` queries over ``[B + M]`` candidates (query ``i``'s positive: column ``i``,
    or ``positives[i]``: a subset of the batch's queries against the whole batch's candidates).

    Logits are ``score / temperature - log_counts`` (the logQ correction, unclipped: TFRS's clips the
    probability to [1e-6, 1], which flattens the uniform share of a corpus above 1M ads); a column
    holding the query's own label ad elsewhere (an accidental hit) is masked out. A sum, as TFRS's
    in-batch loss: summed over replicas it is the global sum. ``weights`` ``[B]``: each query's weight.
    """
    logits = tf.matmul(queries, candidates, transpose_b=True) / temperature - log_counts[tf.newaxis]
    positive = tf.range(tf.shape(queries)[0]) if positives is None else tf.cast(positives, tf.int32)
    own = tf.gather(ids, positive)
    hit = tf.equal(own[:, tf.newaxis], ids[tf.newaxis]) & ~tf.cast(tf.one_hot(positive, tf.shape(ids)[0]), tf.bool)
    logits = tf.where(hit, tf.cast(-1e9, logits.dtype), logits)
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(positive, logits)
    return tf.reduce_sum(losses if weights is None else weights * losses)


class ContextualTwoTower(tfrs.models.Model):
    def __init__(
        self,
        cfg: ModelConfig,
        vocab_sizes: dict[str, int],
        corpus: dict[str, np.ndarray],
        seed: int = 0,
        dense_no_context_share: float = 1.0,
    ):
        super().__init__()
        self.cfg = cfg
        # dense training only (train.dense_no_context_share): the share of a step's targets the no-context loss
        # runs on, drawn at random per step (1: every target)
        self.dense_no_context_share = float(dense_no_context_share)
        d = cfg.embedding_dim
        self.item_embedding = keras.layers.Embedding(vocab_sizes[schema.VOCAB_ITEM], d, name="item_embedding")
        self.advertiser_embedding = keras.layers.Embedding(
            vocab_sizes[schema.VOCAB_ADVERTISER], d, name="advertiser_embedding"
        )
        self.event_type_embedding = keras.layers.Embedding(
            vocab_sizes[schema.VOCAB_EVENT_TYPE], d, name="event_type_embedding"
        )
        self.time_gap_embedding = keras.layers.Embedding(schema.NUM_TIME_GAP_BUCKETS, d, name="time_gap_embedding")
        self.category_embedding = keras.layers.Embedding(
            vocab_sizes[schema.VOCAB_CATEGORY], cfg.category_dim, name="category_embedding"
        )
        self.encoder = SequenceEncoder(
            schema.MAX_HISTORY, d, cfg.blocks, cfg.heads, cfg.ff_dim, cfg.dropout, cfg.causal, name="sequence_encoder"
        )
        self.no_history = self.add_weight(
            name="no_history", shape=(d,), initializer=keras.initializers.RandomNormal(stddev=0.1)
        )
        self.context_layer = (
            ContextLayer(cfg.context_dim, cfg.context_dropout, cfg.context_drop_prob, seed=seed, name="context_layer")
            if cfg.use_context
            else None
        )
        self.cross_attention = self._cross_attention(cfg)
        # model.subject_embedding: the subject ad's id embedding (the shared item table) in the context path
        self.subject_layer = (
            SubjectLayer(cfg.context_dim, name="subject_layer") if cfg.use_context and cfg.subject_embedding else None
        )
        # model.search_query: the search surface's query text as a second context block (its own trust)
        self.query_layer = (
            QueryContextLayer(
                cfg.context_dim,
                cfg.context_dropout,
                cfg.context_drop_prob,
                cfg.query_buckets,
                seed=seed + 7,
                name="query_context",
            )
            if cfg.use_context and cfg.search_query
            else None
        )
        self.demographic_embeddings = {
            feature: keras.layers.Embedding(
                vocab_sizes[schema.DEMOGRAPHIC_VOCAB[column]], cfg.demographic_dim, name=f"{feature}_embedding"
            )
            for column, feature in schema.DEMOGRAPHIC_FEATURE_OF_COLUMN.items()
        }
        self.user_mlp = MLP(cfg.mlp_hidden, cfg.output_dim, name="user_mlp")
        self.candidate_mlp = MLP(cfg.mlp_hidden, cfg.output_dim, name="candidate_mlp")
        self.corpus = {name: tf.constant(corpus[name]) for name in schema.CANDIDATE_FEATURES}
        self.corpus_item_ids = tf.constant(corpus[schema.ITEM_ID])
        self.loss_kind = resolve_loss(cfg, len(corpus[schema.ITEM_ID]))
        self.full_softmax = self.loss_kind == LOSS_FULL_SOFTMAX
        self.negatives = (
            CorpusNegatives(corpus, cfg.sampled_negatives, cfg.sampled_popularity_share)
            if self.loss_kind == LOSS_MIXED
            else None
        )
        self.task = tfrs.tasks.Retrieval(temperature=cfg.temperature, remove_accidental_hits=True)
        # The task holds no weights (no metrics), so it is complete as constructed; built, it is saved with
        # the model like every other layer instead of being skipped with a warning at each export.
        self.task.build(None)
        self._config = {"cfg": dataclasses.asdict(cfg), "vocab_sizes": dict(vocab_sizes), "seed": seed}

    @staticmethod
    def _cross_attention(cfg: ModelConfig) -> CrossAttentionFusion | None:
        """``model.fusion=cross_attention`` (contextual models only: the baseline has no context query)."""
        if not cfg.use_context or cfg.fusion != FUSION_CROSS_ATTENTION:
            return None
        return CrossAttentionFusion(cfg.embedding_dim, cfg.heads, name="cross_attention")

    @property
    def fusion_states(self) -> int:
        """``N``: the encoded states the encoder exports per user (``[N, d]``); 0 = the last state ``[d]``."""
        return self.cfg.fusion_states if self.cross_attention is not None else 0

    def get_config(self) -> dict:
        """The JSON-serializable part of the constructor's arguments (the ad corpus is data, not config)."""
        return dict(self._config)

    # ---- query tower -------------------------------------------------------------------
    def time_gaps(self, features: dict[str, tf.Tensor]) -> tf.Tensor:
        """The history's gap buckets in this model's semantics (``model.time_gap``)."""
        if self.cfg.time_gap == schema.TIME_GAP_NEXT_EVENT and schema.HISTORY_NEXT_GAP in features:
            return features[schema.HISTORY_NEXT_GAP]
        return features[schema.HISTORY_TIME_GAP]

    def encode_history(
        self, features: dict[str, tf.Tensor], training: bool = False, all_positions: bool = False
    ) -> tf.Tensor:
        """History -> ``[B, embedding_dim]``: the offline encoder's output (``[B, L, d]``: every position).

        With cross-attention fusion: ``[B, N, d]``, the last ``N`` states, rows before the first event zeroed.
        """
        events = (
            self.item_embedding(features[schema.HISTORY_ITEM])
            + self.advertiser_embedding(features[schema.HISTORY_ADVERTISER])
            + self.event_type_embedding(features[schema.HISTORY_EVENT_TYPE])
            + self.time_gap_embedding(self.time_gaps(features))
        )
        length = features[schema.HISTORY_LENGTH]
        if self.fusion_states and not all_positions:
            return mask_states(self.encoder(events, length, training=training, last=self.fusion_states), length)
        return self.encoder(events, length, training=training, all_positions=all_positions)

    def dense_targets(
        self, features: dict[str, tf.Tensor], training: bool = False
    ) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        """A batch of sequences -> (state ``[N, d]``, per-target features) of its ``N`` target positions.

        The per-target features use the per-target names (label, context, demographics repeated,
        ``HISTORY_LENGTH`` = the events the position has seen), so the head and the loss are the
        per-target ones. Positions without a target are left out.
        """
        states = self.encode_history(features, training, all_positions=True)
        where = tf.where(features[schema.SEQ_LABEL_ITEM] != schema.PAD_ID)  # [N, 2]: (row, position)
        lengths = position_history_length(features[schema.HISTORY_LENGTH], tf.shape(states)[1])
        state_at = where
        if SEQ_STATE_POSITION in features:  # an earlier position's state (e.g. the last event strictly before)
            state_at = tf.stack([where[:, 0], tf.gather_nd(features[SEQ_STATE_POSITION], where)], axis=1)
        flat = {schema.HISTORY_LENGTH: tf.gather_nd(lengths, state_at)}
        for name, per_target in schema.SEQ_TARGET_FEATURES.items():
            flat[per_target] = tf.gather_nd(features[name], where)
        for name in schema.DEMOGRAPHIC_FEATURES:
            flat[name] = tf.gather(features[name], where[:, 0])
        if SEQ_TARGET_WEIGHT in features:
            flat[TARGET_WEIGHT] = tf.gather_nd(features[SEQ_TARGET_WEIGHT], where)
        if SEQ_SUBJECT_ITEM in features:
            flat[schema.SUBJECT_ITEM] = tf.gather_nd(features[SEQ_SUBJECT_ITEM], where)
        if self.fusion_states:  # each target's window: the N states ending at its state position (causal)
            return self.state_windows(states, state_at, flat[schema.HISTORY_LENGTH]), flat
        return tf.gather_nd(states, state_at), flat

    def state_windows(self, states: tf.Tensor, state_at: tf.Tensor, length: tf.Tensor) -> tf.Tensor:
        """``[T, N, d]``: for each (row, position) of ``state_at``, the states of positions ``position-N+1 ..
        position`` (never a later one), masked by the events seen there ``length`` as the offline encoder's."""
        n = self.fusion_states
        positions = state_at[:, 1:2] - n + 1 + tf.range(n, dtype=state_at.dtype)[tf.newaxis]  # [T, N]
        rows = tf.broadcast_to(state_at[:, :1], tf.shape(positions))
        windows = tf.gather_nd(states, tf.stack([rows, tf.maximum(positions, 0)], axis=-1))
        return mask_states(windows, length)

    def head(self, encoded: tf.Tensor, features: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        """Encoded history + context + demographics -> normalised user embedding (online part)."""
        has_history = tf.reshape(features[schema.HISTORY_LENGTH], [-1, 1]) > 0
        states = encoded
        if self.fusion_states:  # [B, N, d]: the last state is the last row
            encoded = encoded[:, -1]
        parts = [tf.where(has_history, encoded, self.no_history[tf.newaxis])]
        if self.context_layer is not None:
            categories = self.category_embedding(features[schema.CONTEXT_CATEGORIES])
            context = [self.context_layer(categories, features[schema.CONTEXT_WEIGHTS], training=training)]
            if self.query_layer is not None:  # the search surface's block (zero without a query)
                context.append(self.query_layer(queries_of(features, encoded), training=training))
            parts += context
            if self.cross_attention is not None:  # every context block together is the attention's query
                query = context[0] if len(context) == 1 else tf.concat(context, axis=-1)
                parts.append(self.cross_attention(query, states, features[schema.HISTORY_LENGTH]))
        if self.subject_layer is not None:
            parts.append(self.subject_part(features, encoded))
        parts += [self.demographic_embeddings[f](features[f]) for f in schema.DEMOGRAPHIC_FEATURES]
        return self.user_mlp(tf.concat(parts, axis=-1), training=training)

    def subject_part(self, features: dict[str, tf.Tensor], batch_of: tf.Tensor) -> tf.Tensor:
        """``[B, context_dim + 1]``: the subject ad's shared id embedding, zero where it is not an ad; x trust."""
        subject = subject_of(features, batch_of)
        embedding = self.item_embedding(tf.maximum(subject, 0))
        return self.subject_layer(embedding, subject) * self.context_layer.trust

    def query_embedding(self, features: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        return self.head(self.encode_history(features, training), features, training)

    # ---- candidate tower ---------------------------------------------------------------
    def candidate_embedding(self, features: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        categories, _ = weighted_average(
            self.category_embedding(features[schema.LABEL_CATEGORIES]), features[schema.LABEL_CONFIDENCES]
        )
        x = tf.concat(
            [
                self.item_embedding(features[schema.LABEL_ITEM]),
                self.advertiser_embedding(features[schema.LABEL_ADVERTISER]),
                categories,
            ],
            axis=-1,
        )
        return self.candidate_mlp(x, training=training)

    def corpus_embeddings(self, training: bool = False) -> tf.Tensor:
        """``[num_ads, output_dim]``, row ``r`` = the ad with item-vocab index ``r + NUM_RESERVED_IDS``.

        Eagerly (validation, evaluation, export, loading) the tower runs over blocks of
        ``CORPUS_BLOCK`` ads: in one call its activations (``[N, 5, category_dim]`` category vectors,
        ``[N, hidden]``) took ~16 GB at 10M ads, where the result is ``N * output_dim`` floats. In a
        graph (the full-softmax loss, corpora up to ``full_softmax_max_items``) it is one call.
        """
        n = int(self.corpus_item_ids.shape[0])
        if not tf.executing_eagerly() or n <= CORPUS_BLOCK:
            return self.candidate_embedding(self.corpus, training)
        return tf.convert_to_tensor(self.corpus_embeddings_array(training))

    def corpus_embeddings_array(self, training: bool = False) -> np.ndarray:
        """Eager :meth:`corpus_embeddings` as a numpy array, block by block into one preallocated array
        (a list of blocks and their ``tf.concat`` held the corpus twice: +2.56 GB at 10M ads x 64)."""
        n = int(self.corpus_item_ids.shape[0])
        out = np.empty((n, self.cfg.output_dim), np.float32)
        for s in range(0, n, CORPUS_BLOCK):
            block = {k: v[s : s + CORPUS_BLOCK] for k, v in self.corpus.items()}
            out[s : s + CORPUS_BLOCK] = self.candidate_embedding(block, training).numpy()
        return out

    def call(self, features: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        return self.query_embedding(features, training)

    # ---- loss --------------------------------------------------------------------------
    def compute_loss(self, features: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        sequence = is_sequence_batch(features)
        if sequence:
            encoded, features = self.dense_targets(features, training)
        else:
            encoded = self.encode_history(features, training)
        queries = [self.head(encoded, features, training)]
        weights, subsets = [1.0], [None]
        if self.context_layer is not None and self.cfg.no_context_loss_weight > 0:
            subset = None
            if sequence and self.dense_no_context_share < 1.0:
                subset = no_context_subset(tf.shape(encoded)[0], self.dense_no_context_share)
                encoded = tf.gather(encoded, subset)
                features_nc = {name: tf.gather(value, subset) for name, value in features.items()}
            else:
                features_nc = features
            queries.append(self.head(encoded, without_context(features_nc), training))
            weights.append(self.cfg.no_context_loss_weight)
            subsets.append(subset)
        losses = self.retrieval_losses(queries, features, training, subsets)
        return tf.add_n([w * loss for w, loss in zip(weights, losses, strict=True)])

    def retrieval_losses(
        self,
        queries: list[tf.Tensor],
        features: dict[str, tf.Tensor],
        training: bool = False,
        subsets: list[tf.Tensor | None] | None = None,
    ) -> list[tf.Tensor]:
        """The retrieval loss of each query batch against the same labels (candidates computed once).

        ``features[TARGET_WEIGHT]`` (dense training, optional): each query's weight in the loss.
        ``subsets[i]`` (optional): query batch ``i`` holds only these rows of the batch (their labels,
        the whole batch's candidates); its loss estimates the whole batch's (a mean, or a sum scaled by
        rows / subset rows).
        """
        subsets = subsets or [None] * len(queries)
        weights = features.get(TARGET_WEIGHT)
        if self.full_softmax:
            corpus = self.corpus_embeddings(training)
            rows = features[schema.LABEL_ITEM] - schema.NUM_RESERVED_IDS
            out = []
            for q, subset in zip(queries, subsets, strict=True):
                r, w = (rows, weights) if subset is None else (tf.gather(rows, subset), _gather(weights, subset))
                loss = tf.nn.sparse_softmax_cross_entropy_with_logits(
                    r, tf.matmul(q, corpus, transpose_b=True) / self.cfg.temperature
                )
                out.append(global_mean(loss if w is None else w * loss))
            return out
        candidates = self.candidate_embedding(features, training)
        ids, probability = features[schema.LABEL_ITEM], features[schema.LABEL_SAMPLING_PROB]
        if self.negatives is None:
            out = []
            for q, subset in zip(queries, subsets, strict=True):
                c, p, i, w, scale = candidates, probability, ids, weights, 1.0
                if subset is not None:  # in-batch over the subset's own labels
                    c, p, i, w = (tf.gather(x, subset) for x in (candidates, probability, ids, _ones(weights, ids)))
                    scale = _scale(ids, subset)
                loss = self.task(
                    q, c, sample_weight=w, candidate_sampling_probability=p, candidate_ids=i, compute_metrics=False
                )
                out.append(scale * loss)
            return out
        # mixed: + corpus ads drawn once per step, shared by every query (and by both heads)
        rows = self.negatives.sample()
        sampled = {name: tf.gather(self.corpus[name], rows) for name in schema.CANDIDATE_FEATURES}
        candidates = tf.concat([candidates, self.candidate_embedding(sampled, training)], axis=0)
        log_counts = tf.math.log(self.negatives.expected_counts(ids, probability, rows))
        all_ids = tf.concat([ids, rows + schema.NUM_RESERVED_IDS], axis=0)
        out = []
        for q, subset in zip(queries, subsets, strict=True):
            w = weights if subset is None else _gather(weights, subset)
            loss = mixed_softmax_loss(q, candidates, all_ids, log_counts, self.cfg.temperature, w, subset)
            out.append(loss if subset is None else _scale(ids, subset) * loss)
        return out


def no_context_subset(targets: tf.Tensor, share: float) -> tf.Tensor:
    """``ceil(share * targets)`` distinct target rows drawn at random (the no-context loss's share of a dense step)."""
    count = tf.cast(tf.math.ceil(share * tf.cast(targets, tf.float32)), tf.int32)
    return tf.random.shuffle(tf.range(targets))[:count]


def _gather(values: tf.Tensor | None, rows: tf.Tensor) -> tf.Tensor | None:
    return None if values is None else tf.gather(values, rows)


def _ones(weights: tf.Tensor | None, ids: tf.Tensor) -> tf.Tensor:
    return tf.ones(tf.shape(ids), tf.float32) if weights is None else weights


def _scale(ids: tf.Tensor, subset: tf.Tensor) -> tf.Tensor:
    """rows / subset rows: a subset's summed loss as an estimate of the whole batch's sum."""
    return tf.math.divide_no_nan(tf.cast(tf.shape(ids)[0], tf.float32), tf.cast(tf.shape(subset)[0], tf.float32))
