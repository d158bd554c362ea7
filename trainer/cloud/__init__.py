"""Vertex AI: images, job specs built from the SDK's types, local runs of them, deployment, prediction.

`python -m trainer.cloud` (trainer.cloud.cli) is the command; no module here imports TensorFlow.
"""
