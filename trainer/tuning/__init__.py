"""Hyperparameter search: the search-space file (shared with Vertex AI) and the local optuna tuner."""
