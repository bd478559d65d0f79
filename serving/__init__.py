"""Online serving: TF Serving config, the gRPC client, a protocol-compatible model server."""

import tfrs_ctx  # noqa: F401  (sets TF_USE_LEGACY_KERAS before anything imports TensorFlow)
