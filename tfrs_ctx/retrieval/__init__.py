"""Approximate top-K retrieval in core TensorFlow ops (servable by a stock ``tensorflow_model_server``)."""

from tfrs_ctx.retrieval.ivf import IVFIndex, IVFTables, build_tables, default_n_partitions, default_nprobe

__all__ = ["IVFIndex", "IVFTables", "build_tables", "default_n_partitions", "default_nprobe"]
