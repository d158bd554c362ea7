"""`python -m trainer.cloud train|tune|deploy|predict|build ...`: see trainer.cloud.cli."""
from trainer.cloud.cli import main

main()
