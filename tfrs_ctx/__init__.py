"""tfrs-ctx: a contextual sequential two-tower ad candidate generator.

Layers (dependencies point one way; ``tests/test_layout.py`` checks it):

* the core library, this package: ``schema``, ``signatures``, ``config``, ``data`` (raw tables,
  validation, vocabularies, training examples, tf.data), ``sources`` (synthetic, MovieLens),
  ``models``, ``training``, ``evaluation``, ``export``, ``feature_store``, ``testing``. It imports
  none of the layers below;
* ``beam_pipelines``, ``serving`` (``client``, ``model_server``) and the declarative ``feature_repo``;
* the applications, ``tfrs_ctx.apps`` (cli, demo, daily, recommend, studies), and ``benchmarks``.

Importing this package sets the environment TensorFlow reads at import time, once for the whole
project: TensorFlow Recommenders needs Keras 2 (``tf-keras``), so ``TF_USE_LEGACY_KERAS=1``; and
TensorFlow's C++ INFO lines off. ``beam_pipelines``, ``serving`` and ``benchmarks`` import this
package first, so it runs before TensorFlow in every process of the project: the CLI, Beam worker
processes (they import the pipeline modules to unpickle their DoFns), the model server subprocess
and the tests. A value already set in the environment wins.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
