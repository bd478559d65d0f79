"""The protocol-compatible model server: TF Serving's gRPC API for machines without the binary."""
