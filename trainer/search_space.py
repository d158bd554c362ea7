"""`python -m trainer.search_space`, kept for users' scripts: the code is in trainer/tuning/search_space.py."""
from trainer.tuning.search_space import main

if __name__ == "__main__":
    main()
