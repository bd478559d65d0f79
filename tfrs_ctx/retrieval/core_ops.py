"""Which op types a SavedModel uses, and which of them a stock ``tensorflow_model_server`` lacks.

Core = registered in the installed TF's op registry, compiled into TensorFlow itself (has a
``tf.raw_ops`` endpoint: ops of ``tf.load_op_library`` libraries, e.g. ScaNN's, have none) and
with a kernel a CPU ``tensorflow_model_server`` can run (registered for CPU, or for DEFAULT =
every device, as ``Assert`` and ``NoOp`` are). Used by the IVF and the export tests.
"""

from __future__ import annotations

import os


def saved_model_ops(path: str) -> set[str]:
    """Every op type in ``saved_model.pb``: the graphs and every function of their libraries."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    ops = set()
    for meta in proto.meta_graphs:
        ops |= {n.op for n in meta.graph_def.node}
        for fn in meta.graph_def.library.function:
            ops |= {n.op for n in fn.node_def}
    return ops


def non_core_ops(ops: set[str]) -> list[str]:
    """The op types of ``ops`` that are not core TensorFlow ops with a CPU kernel, sorted."""
    import tensorflow as tf
    from tensorflow.python.framework import kernels, op_def_registry

    return sorted(
        op
        for op in ops
        if op_def_registry.get(op) is None
        or not hasattr(tf.raw_ops, op)
        or not {kd.device_type for kd in kernels.get_registered_kernels_for_op(op).kernel} & {"CPU", "DEFAULT"}
    )
