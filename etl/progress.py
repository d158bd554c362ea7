"""How far a run is: Beam counters in the steps, a progress line every few seconds, a summary at the end.

The steps count with `count()`: a Beam metric in the namespace `imagepipe.etl` (Dataflow shows them
in its console, and any runner's PipelineResult has them at the end) and a tally in this process.
Beam's local FnApiRunner only reports metrics once the pipeline has finished, but its workers are
threads of the driver's process (in_memory and multi_threading modes), so `ProgressLog` reads the
tally while the pipeline runs. Cost: ~3 us per count (2 cores under load), 4 counts per record:
~1% of the ~1 ms each image costs.
"""
from __future__ import annotations

import collections
import datetime
import logging
import threading
import time

NAMESPACE = "imagepipe.etl"
ROWS = "rows_read"  # input rows, malformed ones included: records + rejects at the end
IMAGES = "images_read"  # rows whose file the run has opened (or rejected before opening)
RECORDS = "records_written"  # records encoded and handed to the shard writer
RECORD_BYTES = "record_bytes"  # their serialized bytes
REJECTED = "rejected"  # every reject; each also counts under REJECTED_PREFIX + reason
REJECTED_PREFIX = "rejected_"

_log = logging.getLogger("etl")


class _Tally:
    """Counts of this process, readable while the pipeline runs (a lock: multi_threading workers)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts = collections.Counter()
        self._first = {}  # name -> time.time() of its first count

    def add(self, name: str, n: int) -> None:
        with self._lock:
            self._counts[name] += n
            self._first.setdefault(name, time.time())

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def first_time(self, name: str) -> float | None:
        with self._lock:
            return self._first.get(name)

    def forget_first_times(self) -> None:
        with self._lock:
            self._first.clear()


TALLY = _Tally()
_counters = {}


def count(name: str, n: int = 1) -> None:
    """Adds `n` to the Beam counter `name` (inside a step) and to this process's tally."""
    counter = _counters.get(name)
    if counter is None:
        from apache_beam.metrics import Metrics

        counter = _counters[name] = Metrics.counter(NAMESPACE, name)
    counter.inc(n)
    TALLY.add(name, n)


def count_reject(reason: str) -> None:
    count(REJECTED)
    count(REJECTED_PREFIX + reason)


def counts_from_result(result) -> dict[str, int]:
    """The ETL's counters of a finished pipeline, summed over the steps that count them."""
    from apache_beam.metrics.metric import MetricsFilter

    totals = collections.Counter()
    for counter in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
        committed = counter.committed
        totals[counter.key.metric.name] += counter.attempted if committed is None else committed
    return dict(totals)


def format_progress(counts: dict[str, int], seconds: float, rate: float) -> str:
    rows, records, rejected = counts.get(ROWS, 0), counts.get(RECORDS, 0), counts.get(REJECTED, 0)
    done = f" ({(records + rejected) / rows:.0%} of {rows:,} rows)" if rows else ""
    return (f"progress {_clock(seconds)}: {counts.get(IMAGES, 0):,} images read, {records:,} records written "
            f"({size_text(counts.get(RECORD_BYTES, 0))}), {rejected:,} rejected{done}; {rate:,.0f} records/s")


class ProgressLog:
    """Logs `format_progress` every `seconds` while the `with` block runs (0: never)."""

    def __init__(self, seconds: float):
        self._seconds = seconds
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        self._start = time.perf_counter()
        self._base = TALLY.snapshot()  # earlier runs in this process (tests, benchmarks) are not ours
        TALLY.forget_first_times()
        if self._seconds > 0:
            self._thread = threading.Thread(target=self._report, name="etl-progress", daemon=True)
            self._thread.start()
        return self

    def counts(self) -> dict[str, int]:
        """This run's counts so far."""
        now = TALLY.snapshot()
        return {name: value - self._base.get(name, 0) for name, value in now.items()}

    def first_record_after(self, since: float) -> float | None:
        """Seconds from `since` (a time.time()) to this run's first record: when the work started,
        TensorFlow's import by the steps included. None: no record, or none in this process."""
        first = TALLY.first_time(RECORDS)
        return None if first is None else first - since

    def _report(self) -> None:
        last_time, last_records = self._start, 0
        while not self._stop.wait(self._seconds):
            counts, now = self.counts(), time.perf_counter()
            records = counts.get(RECORDS, 0)
            _log.info("%s", format_progress(counts, now - self._start, (records - last_records) / (now - last_time)))
            last_time, last_records = now, records

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return False


def summary_lines(meta, seconds: float, first_record_after: float | None = None) -> list[str]:
    """The end of a run: records per split, bytes and shards, rejects by reason, wall time."""
    splits = meta.splits.values()
    records = sum(s.num_examples for s in splits)
    size = sum(shard.num_bytes for s in splits for shard in s.shards)
    shards = sum(len(s.shards) for s in splits)
    rejected = meta.extra["rejected"]
    reasons = ", ".join(f"{reason} {n:,}" for reason, n in rejected["by_reason"].items())
    start_up = f", the first record written after {first_record_after:.1f} s" if first_record_after is not None else ""
    return [f"records: {', '.join(f'{name} {split.num_examples:,}' for name, split in meta.splits.items())} "
            f"({records:,} in all); {size_text(size)} in {shards} shard{'s' if shards != 1 else ''}",
            f"rejected: {rejected['count']:,}{f' ({reasons})' if reasons else ''} of "
            f"{meta.extra['input']['num_rows']:,} rows",
            f"wall time: {_clock(seconds)}{start_up}"]


def size_text(num_bytes: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if num_bytes < 1024 or unit == "GB":
            return f"{num_bytes:,.0f} bytes" if unit == "bytes" else f"{num_bytes:,.1f} {unit}"
        num_bytes /= 1024


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))
