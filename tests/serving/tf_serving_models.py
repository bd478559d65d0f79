"""Test SavedModels equivalent to TF Serving's ``saved_model_half_plus_two_*`` test data, written by tests.

Our own generator (TF 2.x ``tf.compat.v1`` and ``tf.Module`` APIs) of models that behave like the ones
``tensorflow_serving/servables/tensorflow/testdata/saved_model_half_plus_two.py`` builds, so the
behaviours TF Serving's own tests assert can be checked against this project's compatible server.
Nothing here is committed as a SavedModel: tests write the models into their tmp dirs.

* :func:`write_half_plus_two` (TF1 graph, ``SavedModelBuilder``): variables ``a=0.5, b, c=3``; a
  ``tf_example`` string placeholder ``[None]`` parsed as ``x`` (float ``[1]``) and ``x2`` (float ``[1]``,
  default 0); ``y = a*x + b``, ``y2 = a*x + c``, ``y3 = a*x2 + c``. Signatures: ``serving_default``
  (predict, ``x`` -> ``y``: ``x`` is the parse's output tensor, fed directly, shape ``[-1,1]``),
  ``regress_x_to_y`` / ``regress_x_to_y2`` (``inputs`` = serialized tf.Example -> ``outputs``),
  ``regress_x2_to_y3`` (``inputs`` = x2 -> ``outputs``), ``classify_x_to_y`` (``inputs`` -> ``scores``)
  and, beyond the original, ``multi`` (predict, ``x``, ``x2`` -> ``y``, ``y2``, ``y3``) and
  ``multi_with_default`` (``x``, ``x2`` -> ``y``, ``y3``, with a ``defaults`` entry ``x2 = [[1.0]]``).
* :func:`write_half_plus_two_tf2` (``tf.saved_model.save`` of a ``tf.Module``): the same signatures
  as native TF2 functions; ``serving_default`` takes ``x`` float ``[1]``.
* :func:`write_mixed_inputs` (TF2): ``serving_default(text string[B], count int64[B], score float[B,2])``
  -> ``text_bytes`` (the text again: a ``_bytes`` output, base64 over REST), ``length`` (int32),
  ``total`` (float ``count + sum(score)``); and ``echo_scalar(v float[])`` -> ``v`` for rank-0 tensors.
"""

from __future__ import annotations

import os
from pathlib import Path

import tensorflow as tf

v1 = tf.compat.v1
A, C = 0.5, 3.0


def _feature_spec() -> dict:
    return {
        "x": tf.io.FixedLenFeature([1], tf.float32),
        "x2": tf.io.FixedLenFeature([1], tf.float32, default_value=[0.0]),
    }


def write_half_plus_two(path: str | os.PathLike, b: float = 2.0) -> Path:
    """The TF1 half_plus_two graph (``y = 0.5 * x + b``) as a SavedModel at ``path``."""
    path = Path(path)
    sig_utils, build_info = v1.saved_model.signature_def_utils, v1.saved_model.utils.build_tensor_info
    consts = v1.saved_model.signature_constants
    graph = tf.Graph()
    with graph.as_default(), v1.Session(graph=graph) as sess:
        a = v1.Variable(A, name="a")
        b_var = v1.Variable(b, name="b")
        c = v1.Variable(C, name="c")
        serialized = v1.placeholder(tf.string, name="tf_example", shape=[None])
        parsed = v1.parse_example(serialized, _feature_spec())
        x = tf.identity(parsed["x"], name="x")
        y = tf.identity(a * x + b_var, name="y")
        y2 = tf.identity(a * x + c, name="y2")
        x2 = tf.identity(parsed["x2"], name="x2")
        y3 = tf.identity(v1.Variable(A, name="a2") * x2 + v1.Variable(C, name="c2"), name="y3")

        def predict(inputs, outputs):
            return sig_utils.build_signature_def(
                {k: build_info(t) for k, t in inputs.items()},
                {k: build_info(t) for k, t in outputs.items()},
                consts.PREDICT_METHOD_NAME,
            )

        def regress(inp, out):
            return sig_utils.build_signature_def(
                {consts.REGRESS_INPUTS: build_info(inp)},
                {consts.REGRESS_OUTPUTS: build_info(out)},
                consts.REGRESS_METHOD_NAME,
            )

        signatures = {
            consts.DEFAULT_SERVING_SIGNATURE_DEF_KEY: predict({"x": x}, {"y": y}),
            "regress_x_to_y": regress(serialized, y),
            "regress_x_to_y2": regress(serialized, y2),
            "regress_x2_to_y3": regress(x2, y3),
            "classify_x_to_y": sig_utils.build_signature_def(
                {consts.CLASSIFY_INPUTS: build_info(serialized)},
                {consts.CLASSIFY_OUTPUT_SCORES: build_info(y)},
                consts.CLASSIFY_METHOD_NAME,
            ),
            "multi": predict({"x": x, "x2": x2}, {"y": y, "y2": y2, "y3": y3}),
            "multi_with_default": predict({"x": x, "x2": x2}, {"y": y, "y3": y3}),
        }
        # A SignatureDef ``defaults`` entry (an input the request may leave out), as predict_util.cc allows.
        signatures["multi_with_default"].defaults["x2"].CopyFrom(tf.make_tensor_proto([[1.0]], tf.float32))
        sess.run(v1.global_variables_initializer())
        builder = v1.saved_model.Builder(str(path))
        builder.add_meta_graph_and_variables(sess, [v1.saved_model.tag_constants.SERVING], signature_def_map=signatures)
        builder.save()
    return path


class _HalfPlusTwo(tf.Module):
    def __init__(self, b: float):
        super().__init__()
        self.a = tf.Variable(A, name="a")
        self.b = tf.Variable(b, name="b")
        self.c = tf.Variable(C, name="c")

    def _x(self, serialized):
        return tf.io.parse_example(serialized, _feature_spec())["x"]

    @tf.function(input_signature=[tf.TensorSpec([1], tf.float32, name="x")])
    def predict(self, x):
        return {"y": self.a * x + self.b}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def regress_xy(self, inputs):
        return {"outputs": self.a * self._x(inputs) + self.b}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def classify_xy(self, inputs):
        return {"scores": self.a * self._x(inputs) + self.b}


def write_half_plus_two_tf2(path: str | os.PathLike, b: float = 2.0) -> Path:
    """half_plus_two as a native TF2 SavedModel (``serving_default`` x float[1] -> y)."""
    module = _HalfPlusTwo(b)
    signatures = {"serving_default": module.predict, "regress_x_to_y": module.regress_xy}
    signatures["classify_x_to_y"] = module.classify_xy
    tf.saved_model.save(module, str(path), signatures=signatures)
    return Path(path)


class _Mixed(tf.Module):
    @tf.function(
        input_signature=[
            tf.TensorSpec([None], tf.string, name="text"),
            tf.TensorSpec([None], tf.int64, name="count"),
            tf.TensorSpec([None, 2], tf.float32, name="score"),
        ]
    )
    def serve(self, text, count, score):
        return {
            "text_bytes": text,
            "length": tf.strings.length(text) + tf.zeros_like(count, tf.int32),
            "total": tf.cast(count, tf.float32) + tf.reduce_sum(score, axis=1),
        }

    @tf.function(input_signature=[tf.TensorSpec([], tf.float32, name="v")])
    def echo_scalar(self, v):
        return {"v": v * 2.0}


def write_saved_model_save(path: str | os.PathLike, signatures: dict[str, float] | None = None) -> Path:
    """As TF Serving's ``test_tf_saved_model_save*``: ``tf.train.Checkpoint`` roots with functions of an
    unknown-rank float ``x``. Without ``signatures``: one, ``y = 3 * 2 * x``; with ``{key: c}``: each
    signature returns the constant ``y = c``."""
    root = tf.train.Checkpoint()
    if signatures is None:
        root.v1, root.v2 = tf.Variable(3.0), tf.Variable(2.0)
        root.f = tf.function(lambda x: {"y": root.v1 * root.v2 * x})
        tf.saved_model.save(root, str(path), root.f.get_concrete_function(tf.TensorSpec(None, tf.float32)))
        return Path(path)
    functions = {}
    for key, value in signatures.items():
        fn = tf.function(lambda x, value=value: {"y": tf.constant(value)}, input_signature=[tf.TensorSpec(None)])
        setattr(root, f"f_{len(functions)}", fn)
        functions[key] = fn
    tf.saved_model.save(root, str(path), signatures=functions)
    return Path(path)


def write_mixed_inputs(path: str | os.PathLike) -> Path:
    """A TF2 model with string + int64 + float inputs (see the module docstring)."""
    module = _Mixed()
    tf.saved_model.save(
        module, str(path), signatures={"serving_default": module.serve, "echo_scalar": module.echo_scalar}
    )
    return Path(path)
