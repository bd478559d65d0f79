"""Multi-worker training: the cluster, the strategy, the chief's files, decisions every worker shares.

``tfrs-ctx train`` is one worker of a cluster when ``TF_CONFIG`` names one (or the flags
``--worker_hosts h1:p,h2:p --task_index i`` write it); without it training runs in one process
under TensorFlow's default strategy, exactly as before. In a cluster:

* the strategy (``tf.distribute.MultiWorkerMirroredStrategy``, ring all-reduce over gRPC) is
  created before any other TensorFlow op (collective ops can only be configured at startup):
  :func:`make_strategy` comes first in ``train.main``;
* every variable is mirrored on every worker (each holds the whole model and optimizer state)
  and gradients are summed across workers every step; ``train.batch_size`` is the *global*
  batch, each worker computes ``batch_size / workers`` of it (see ``two_tower``'s loss);
* worker 0 is the chief: it writes the run directory (checkpoints, ``final/``, the summary); the
  others save to a temporary directory that is deleted (:func:`write_dir`), never over the
  chief's files. Checkpoint restore reads the chief's directory, so it must be on a file system
  every worker sees (NFS, GCS) for resume to work;
* anything that decides the control flow (early stopping, the chosen context trust) is computed
  identically on every worker and then taken from the chief by an all-reduce (:func:`from_chief`),
  so no worker can leave the training loop while the others wait in a collective.
"""

from __future__ import annotations

import json
import os
import shutil

TF_CONFIG = "TF_CONFIG"
WORKER_TMP_PREFIX = ".worker_tmp_"
DEFAULT_COLLECTIVE_TIMEOUT_S = 300.0


def write_tf_config(worker_hosts: str, task_index: int) -> dict:
    """Set ``TF_CONFIG`` for worker ``task_index`` of ``worker_hosts`` ("h1:port,h2:port"); returns it."""
    hosts = [h.strip() for h in worker_hosts.split(",") if h.strip()]
    if not hosts:
        raise ValueError("--worker_hosts is empty")
    if not 0 <= task_index < len(hosts):
        raise ValueError(f"--task_index {task_index} is not in [0, {len(hosts)})")
    config = {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": task_index}}
    os.environ[TF_CONFIG] = json.dumps(config)
    return config


def cluster_config() -> dict | None:
    """The parsed ``TF_CONFIG`` when it names a cluster of workers, else ``None`` (one process)."""
    raw = os.environ.get(TF_CONFIG, "").strip()
    if not raw:
        return None
    config = json.loads(raw)
    workers = config.get("cluster", {}).get("worker", [])
    if not workers:
        raise ValueError(f"TF_CONFIG has no cluster.worker list: {raw}")
    if set(config["cluster"]) - {"worker"}:
        raise ValueError(f"TF_CONFIG: only 'worker' tasks are supported (worker 0 is the chief): {raw}")
    return config


def make_strategy(collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S):
    """MultiWorkerMirroredStrategy when ``TF_CONFIG`` names a cluster, else the default strategy.

    Call it before any other TensorFlow op. ``collective_timeout_s`` turns a peer that died or
    hangs into an error on the others instead of a wait without end.
    """
    import tensorflow as tf

    if cluster_config() is None:
        return tf.distribute.get_strategy()
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.RING,
        timeout_seconds=collective_timeout_s,
    )
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def is_multi_worker(strategy) -> bool:
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def num_workers(strategy) -> int:
    return strategy.cluster_resolver.cluster_spec().num_tasks("worker") if is_multi_worker(strategy) else 1


def task_index(strategy) -> int:
    return int(strategy.cluster_resolver.task_id or 0) if is_multi_worker(strategy) else 0


def is_chief(strategy) -> bool:
    return task_index(strategy) == 0


def write_dir(path: str, strategy) -> str:
    """Where this worker writes what belongs at ``path``: ``path`` on the chief, else a temporary
    ``path/.worker_tmp_<i>`` (delete it with :func:`discard`)."""
    return path if is_chief(strategy) else os.path.join(path, f"{WORKER_TMP_PREFIX}{task_index(strategy)}")


def discard(path: str, strategy) -> None:
    """Delete a non-chief worker's temporary directory (nothing on the chief)."""
    if not is_chief(strategy):
        shutil.rmtree(path, ignore_errors=True)


def from_chief(strategy, value: float) -> float:
    """The chief's ``value`` on every worker (an all-reduce; every worker must call it, in the same order)."""
    if not is_multi_worker(strategy):
        return value
    import tensorflow as tf

    mine = float(value) if is_chief(strategy) else 0.0
    per_replica = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(mine if ctx.replica_id_in_sync_group == 0 else 0.0, tf.float64)
    )
    return float(strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None))
