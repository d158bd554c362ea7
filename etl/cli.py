"""`python -m etl`: logging, the refusals that need neither Beam nor TensorFlow, then `etl.pipeline.run`.

`--help`, a flag error, a bad class names file, an --output inside the input or a non-empty local
--output answer before Beam loads (~0.3 s); a gs:// --output is read through Beam, and a flag meant
for Beam is checked by Beam, both before TensorFlow loads (~1.5 s; TensorFlow alone takes ~5 s to
import). Refusals (EtlError) are one line and exit 2; any other error is a bug and keeps its
traceback (exit 1).
"""
from __future__ import annotations

import logging
import sys
from typing import NoReturn, Sequence

from etl import preflight
from etl.errors import EtlError
from shared import native_log


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # Beam narrates its own work at INFO (~60 "Converting string literal type hint to Any" lines per
    # run, shard renames, bundle sizes). Its warnings stay, and so do Dataflow's job URL and states.
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    logging.getLogger("apache_beam.runners.dataflow").setLevel(logging.INFO)


def refuse(error: Exception) -> NoReturn:
    print(f"etl: error: {error}", file=sys.stderr)
    sys.exit(2)


def main(argv: Sequence[str] | None = None) -> None:
    configure_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        checked = preflight.check_run(argv)
    except EtlError as e:
        refuse(e)
    native_log.load_tensorflow()  # before Beam's threads start
    from etl import pipeline  # Beam

    try:
        meta = pipeline.run(argv, checked)
    except EtlError as e:
        refuse(e)
    counts = ", ".join(f"{name}={split.num_examples}" for name, split in meta.splits.items())
    print(f"etl: wrote {counts}, rejected={meta.extra['rejected']['count']}")
