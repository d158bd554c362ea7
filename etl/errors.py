"""The ETL's deliberate refusals.

`python -m etl` prints an `EtlError` (publish's OutputNotEmptyError and TooManyRejectsError are ones)
as one line and exits 2; any other exception is a bug and keeps its traceback (exit 1).
"""


class EtlError(ValueError):
    """A flag, input or output the ETL refuses; the message names it and says how to fix it."""
