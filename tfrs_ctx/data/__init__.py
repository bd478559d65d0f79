"""Raw tables, their validation, vocabularies, training examples and the tf.data reader."""
