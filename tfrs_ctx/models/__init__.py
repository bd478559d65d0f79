"""The model: Keras layers and the TFRS contextual sequential two-tower model."""
