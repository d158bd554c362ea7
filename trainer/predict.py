"""`python -m trainer.predict`, kept for users' scripts: the code is in trainer/serving/predict.py."""
import sys

from trainer.serving.predict import run

if __name__ == "__main__":
    sys.exit(run())
