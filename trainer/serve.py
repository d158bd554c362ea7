"""`python -m trainer.serve`, kept for users' scripts: the code is in trainer/serving/serve.py."""
from trainer.serving.serve import run

if __name__ == "__main__":
    run()
