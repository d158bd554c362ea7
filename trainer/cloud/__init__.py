"""Vertex AI: job specs built from the SDK's types, and the `python -m trainer.cloud` command."""
