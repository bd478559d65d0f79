"""The online client: Feast reads of stored user state + live context -> one Predict call."""
