"""`python -m trainer.tune`, kept for users' scripts: the code is in trainer/tuning/tune.py."""
from trainer.tuning.tune import main

if __name__ == "__main__":
    main()
