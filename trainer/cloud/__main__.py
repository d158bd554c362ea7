"""`python -m trainer.cloud train|tune ...`: see trainer.cloud.jobs."""
from trainer.cloud.jobs import main

main()
