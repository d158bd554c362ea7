"""`python -m trainer.bytes_only_export`, kept for users' scripts: the code is in trainer/serving/bytes_only_export.py."""
import sys

from trainer.serving.bytes_only_export import run

if __name__ == "__main__":
    sys.exit(run())
