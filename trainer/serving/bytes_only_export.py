"""A copy of a training run's export with `serving_default` only, for TF Serving or a Vertex AI endpoint:

    python -m trainer.bytes_only_export --model runs/r1/export --output runs/r1/export_bytes_only

Those servers offer every signature of a SavedModel to every client, and the export's
`predict_filenames` reads the paths a client sends inside the graph: any file or bucket object the
server can reach. (`trainer.serve` runs `serving_default` only, and reads `filenames` instances
itself, under --allow_root.)
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence


def run(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.bytes_only_export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the export folder a training run wrote (runs/<run>/export)")
    p.add_argument("--output", required=True, help="a new folder for the copy (local or gs://)")
    args = p.parse_args(argv)
    from trainer.export import write_bytes_only_export
    from trainer.serving.exported_model import ExportError

    try:
        write_bytes_only_export(args.model, args.output)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {args.model} with serving_default only")
    return 0


if __name__ == "__main__":
    sys.exit(run())
