import os

# TensorFlow's C++ start-up chatter (CUDA probes, oneDNN notes) hides the ETL's own log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from etl.cli import main  # noqa: E402

main()
