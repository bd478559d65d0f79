"""Online serving: TF Serving config, the gRPC client, a protocol-compatible model server."""
