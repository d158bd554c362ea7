"""Kill -9 an `--overwrite` ETL run at each of its stop points; after each kill, check the folder.

    python -m tests.overwrite_kill_points [--work DIR]     # prints the table of kill points
    python -m tests.overwrite_kill_points --gcs_emulator   # the same with --output on gs:// (an emulator)
    python -m tests.overwrite_kill_points --output gs://B/P   # on the Cloud Storage that the environment names

The invariant, checked after every kill without project code: `metadata.json` parses and every
shard it lists exists with the size and sha256 it records; the sidecar is the old dataset's
before the commit and the new one's after it. Then a rerun (`--overwrite`) must succeed and leave
exactly its sidecar, rejects.jsonl and the shards it lists. Last, a run paused inside publishing
must not lose its staging folder to a second `--overwrite` run, which is refused.

This process imports the ETL once and forks a child per run (a tiny pipeline, not a TensorFlow
import, per kill point); it runs no pipeline itself, so each child starts single-threaded. On
gs:// the children reach Cloud Storage through the environment they inherit (STORAGE_EMULATOR_HOST
and credentials, set before the first fork); Beam makes a new storage client, with its own HTTP
session, for every call, so no connection is shared across a fork. The input stays a local folder.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

from apache_beam.io.filesystems import FileSystems

from etl import pipeline, publish, records  # noqa: F401  (imported once, before forking)
from shared import layout, preprocess  # noqa: F401  (TensorFlow, which the run imports lazily)
from shared.paths import is_remote
from tests import gcs_emulator, image_factory

THREAD_JOIN_SECONDS = 30  # a metadata fetch takes milliseconds; its own request timeout is 10 s
# jpeg: its runs cost ~1.3 s of CPU against ~2.2 s for pixels (TensorFlow's tracing in each child), and
# publishing, where the invariant is at stake, is the same for every form.
FLAGS = ["--form", "jpeg", "--split", "100,0,0", "--min_shards", "2", "--overwrite"]
# One point of each phase of a run: the tests assert each was killed (a renamed point would drop out
# silently); enough where a full run of points costs too much.
PHASES = ("create-staging#1", "write-shard#1", "move-shard#2", "commit-sidecar#1", "write-rejects#1",
          "delete-unlisted#2", "discard-staging#1")


def make_input(folder: str) -> str:
    image_factory.write_class_folders(folder, classes=("a", "b"), per_class=5)
    with open(os.path.join(folder, "a", "not-an-image.jpg"), "w") as f:
        f.write("text")  # one reject, so that rejects.jsonl has a line
    return folder


def read_bytes(path: str) -> bytes:
    if not is_remote(path):
        with open(path, "rb") as f:
            return f.read()
    return gcs_emulator.download(path)  # Beam's FileSystems: any remote file system, the emulator's too


def is_file(path: str) -> bool:
    return os.path.isfile(path) if not is_remote(path) else FileSystems.exists(path)


def files_under(folder: str) -> list[str]:
    """Paths relative to `folder` of every file below it (on an object store: every object under its prefix)."""
    if not is_remote(folder):
        return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files)
    return sorted(gcs_emulator.list_objects(folder))


def entries(folder: str) -> set[str]:
    """Names directly in `folder`; "" is the placeholder object of a folder made in the Cloud Console."""
    if not is_remote(folder):
        return set(os.listdir(folder))
    return {path.split("/", 1)[0] for path in files_under(folder)} - {""}


def fork() -> int:
    """os.fork() once this process runs no other thread: a lock a thread holds at the fork stays held
    in the child forever. google-cloud-storage (3.17) starts a thread per client to fetch the bucket's
    metadata, so after a gs:// read the parent waits for it (one request) before forking."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread():
            thread.join(timeout=THREAD_JOIN_SECONDS)
    assert threading.active_count() == 1, f"cannot fork safely, threads still running: {threading.enumerate()}"
    return os.fork()


def run_child(argv: list[str], env: dict[str, str], log: str) -> tuple[str, str]:
    """Runs `pipeline.run(argv)` in a forked child: ("ok" | "killed" | "failed", error text)."""
    error_file = log + ".error"
    pid = fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            os.environ.update(env)
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            pipeline.run(argv)
            code = 0
        except BaseException as e:
            with open(error_file, "w") as f:
                f.write(f"{type(e).__name__}: {e}")
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return "killed", ""
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return "ok", ""
    text = open(error_file).read() if os.path.exists(error_file) else f"status {status}"
    if os.path.exists(error_file):
        os.remove(error_file)
    return "failed", text


def check_folder(out: str) -> tuple[set[str], list[str]]:
    """(files the sidecar lists, problems): the sidecar parses; each listed shard has its size and sha256."""
    try:
        body = json.loads(read_bytes(layout.join(out, layout.METADATA_FILE)))
        shards = [s for split in body["splits"].values() for s in split["shards"]]
    except Exception as e:
        return set(), [f"{layout.METADATA_FILE}: {type(e).__name__}: {e}"]
    problems = []
    for s in shards:
        path = layout.join(out, s["file"])
        if not is_file(path):
            problems.append(f"{s['file']} missing")
            continue
        data = read_bytes(path)
        if len(data) != s["num_bytes"] or hashlib.sha256(data).hexdigest() != s["sha256"]:
            problems.append(f"{s['file']} has {len(data)} bytes / another sha256 than listed")
    return {s["file"] for s in shards}, problems


def other_entries(out: str, listed: set[str]) -> list[str]:
    return sorted(entries(out) - listed - {layout.METADATA_FILE, layout.REJECTS_FILE})


def describe(entries: list[str]) -> str:
    staging = sum(e.startswith(publish.TEMP_PREFIX) for e in entries)
    shards = sum(layout.parse_shard_file_name(e) is not None for e in entries)
    parts = ([f"{staging} staging folder"] if staging else []) + \
        ([f"{shards} unlisted shard{'s' if shards > 1 else ''}"] if shards else [])
    rest = len(entries) - staging - shards
    return ", ".join(parts + ([f"{rest} other"] if rest else [])) or "nothing else"


def kill_points(work: str, out: str | None = None, only: list[str] | None = None) -> dict:
    """Runs the whole experiment in `work`, with the dataset in `out` (default `work`/out; gs:// too:
    it must not exist yet), killing at every point of the trace or at those in `only`; returns
    {"trace": [...points], "points": [...rows], "guard": {...}}."""
    source = make_input(os.path.join(work, "in"))
    out = out or os.path.join(work, "out")
    argv = ["--input", source, "--output", out, *FLAGS]
    log = os.path.join(work, "child.log")
    trace = os.path.join(work, "trace.txt")
    assert run_child(argv, {}, log)[0] == "ok", open(log).read()[-3000:]
    status, error = run_child(argv, {"ETL_STOP_TRACE": trace}, log)  # an --overwrite run, listing its points
    assert status == "ok", error
    points = open(trace).read().split()
    missing = sorted(set(only or ()) - set(points))
    assert not missing, f"points {missing} are not in the trace of a run: {points}"
    rows = []
    for point in [p for p in points if only is None or p in only]:
        before, _ = check_folder(out)
        status, error = run_child(argv, {"ETL_STOP_AT": point}, log)
        listed, problems = check_folder(out)
        row = {"point": point, "status": status, "error": error, "problems": problems,
               "sidecar": "old" if listed == before else "new" if listed else "none",
               "left": describe(other_entries(out, listed))}
        status, error = run_child(argv, {}, log)
        listed, problems = check_folder(out)
        left = other_entries(out, listed)
        row["rerun"] = "ok, clean" if status == "ok" and not problems and not left else \
            f"{status} {error} {problems} left {left}"
        rows.append(row)
    return {"trace": points, "points": rows, "guard": live_run_guard(argv, work, log)}


def live_run_guard(argv: list[str], work: str, log: str) -> dict:
    """Run A pauses after moving its first shard into the output; run B (--overwrite) meanwhile."""
    out = argv[argv.index("--output") + 1]
    pause = os.path.join(work, "paused")
    pid = fork()
    if pid == 0:
        os.environ.update({"ETL_STOP_AT": "move-shard#1", "ETL_STOP_PAUSE": pause})
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        try:
            pipeline.run(argv)
        finally:
            os._exit(0)
    deadline = time.time() + 120
    while not os.path.exists(pause) and time.time() < deadline:
        time.sleep(0.02)
    staging = [e for e in entries(out) if e.startswith(publish.TEMP_PREFIX)]
    staged_files = [layout.join(e, f) for e in staging for f in files_under(layout.join(out, e))]
    status, error = run_child(argv, {}, log)
    still = [layout.join(e, f) for e in staging for f in files_under(layout.join(out, e))]
    os.remove(pause)
    _, a_status = os.waitpid(pid, 0)
    listed, problems = check_folder(out)
    return {"paused_at_pause_file": bool(staging), "second_run": status, "second_error": error,
            "staging_kept": bool(staged_files) and still == staged_files, "first_run_exit": a_status,
            "after": {"problems": problems, "left": other_entries(out, listed)}}


def format_table(result: dict) -> str:
    killed, traced = len(result["points"]), len(result["trace"])
    lines = [f"{killed if killed == traced else f'{killed} of {traced}'} kill points (SIGKILL at each; "
             "the trace of one full --overwrite run):", "",
             "| kill point | process | sidecar after the kill | listed shards | also in the folder | rerun |",
             "|---|---|---|---|---|---|"]
    for r in result["points"]:
        shards = "all present, sizes and sha256 match" if not r["problems"] else "; ".join(r["problems"])
        lines.append(f"| {r['point']} | {r['status']} | {r['sidecar']} | {shards} | {r['left']} | {r['rerun']} |")
    g = result["guard"]
    lines += ["", f"live-run guard: run A paused after its first shard move; a second --overwrite run: "
                  f"{g['second_run']} ({g['second_error']}); A's staging kept: {g['staging_kept']}; "
                  f"A then exited {g['first_run_exit']}, folder problems {g['after']['problems'] or 'none'}, "
                  f"left {g['after']['left'] or 'nothing'}"]
    return "\n".join(lines)


def run_in_subprocess(work: str, output: str | None = None, only: tuple[str, ...] = (),
                      timeout: float = 900) -> dict:
    """The experiment in a fresh interpreter (forking needs a process without threads, which pytest's
    is not once a test ran a pipeline); the environment passes on, an emulator's included."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    flags = ["--json", "--work", work, *(["--output", output] if output else []),
             *(["--points", ",".join(only)] if only else [])]
    proc = subprocess.run([sys.executable, "-m", "tests.overwrite_kill_points", *flags],
                          cwd=root, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_one_complete_dataset_throughout(result: dict) -> None:
    """Every point killed, nothing missing or corrupt, the old sidecar before the commit and the new
    one after, every rerun clean, and the live-run guard held."""
    points = result["points"]
    names = [p["point"] for p in points]
    for phase in PHASES:
        assert phase in names, names
    commit = names.index("commit-sidecar#1")
    for i, p in enumerate(points):
        assert p["status"] == "killed", p
        assert p["problems"] == [], p
        assert p["sidecar"] == ("old" if i < commit else "new"), p
        assert p["rerun"] == "ok, clean", p
    guard = result["guard"]
    assert guard["paused_at_pause_file"] and guard["staging_kept"], guard
    assert guard["second_run"] == "failed" and "another ETL run is writing" in guard["second_error"], guard
    assert guard["first_run_exit"] == 0 and guard["after"] == {"problems": [], "left": []}, guard


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", help="folder for the input and the runs (default: a new temporary one)")
    parser.add_argument("--output", help="where the runs write the dataset, a new folder or gs:// prefix "
                        "(default: WORK/out); the environment must reach its file system")
    parser.add_argument("--gcs_emulator", action="store_true",
                        help="start a Cloud Storage emulator and write the dataset to gs:// in it")
    parser.add_argument("--points", help="comma-separated kill points (default: every point of the trace)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON, not as a table")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        work = args.work or stack.enter_context(tempfile.TemporaryDirectory(prefix="kill-points-"))
        os.makedirs(work, exist_ok=True)
        out = args.output
        if args.gcs_emulator:  # set before the first fork, so that every child inherits it
            os.environ.update(stack.enter_context(gcs_emulator.running_emulator(work)))
            out = out or f"gs://{gcs_emulator.BUCKET}/kill-points"
        result = kill_points(work, out, args.points.split(",") if args.points else None)
    print(json.dumps(result) if args.json else format_table(result))


if __name__ == "__main__":
    sys.exit(main())
