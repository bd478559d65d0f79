"""Apache Beam pipelines: training data (TFRecords) and offline user encoding."""
