"""Apache Beam pipelines: training data (TFRecords) and offline user encoding.

``build_training_data`` and ``encode_users`` are each options + pipeline construction +
``run(argv)``; what both share is in ``tables`` (reading, validation, dead letters, files),
``combiners`` and ``runner`` (runner selection, the CLI wrapper, counters); the user-encoding
pipeline's RunInference handler is ``encoder_inference`` and the Feast rows it writes ``store_rows``.
"""

import tfrs_ctx  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything imports TensorFlow)
