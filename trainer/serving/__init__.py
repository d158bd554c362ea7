"""Serving an export: load and check it, predict files, the REST server, the bytes-only copy, and their benchmark.

Nothing here imports tf_keras or the training code: a serving image installs `.[serving]` only.
"""
