"""--overwrite: the folder holds one complete dataset at every instant, and a live run is never overrun."""
import json
import os

import pytest

from etl import pipeline, publish
from shared import layout


def test_a_kill_at_any_point_of_an_overwrite_leaves_one_complete_dataset(tmp_path):
    """`python -m tests.overwrite_kill_points` prints the same experiment as a table."""
    from tests.overwrite_kill_points import assert_one_complete_dataset_throughout, format_table, run_in_subprocess

    result = run_in_subprocess(str(tmp_path))
    print(format_table(result))  # the table for the note: pytest -s shows it
    assert_one_complete_dataset_throughout(result)


def _shard(out, split, index, count, generation, body=b"x"):
    name = layout.shard_file_name(split, index, count, generation)
    (out / name).write_bytes(body)
    return name


def _sidecar(out, files):
    shards = [{"file": f, "num_examples": 1, "num_bytes": 1, "sha256": "-"} for f in files]
    (out / layout.METADATA_FILE).write_text(json.dumps({"splits": {"train": {"num_examples": 1, "shards": shards}}}))


def test_cleanup_removes_what_no_sidecar_lists_and_never_a_listed_file(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    live = [_shard(out, "train", i, 2, "aaaaaaaaaaaa") for i in range(2)]
    _sidecar(out, live)
    _shard(out, "train", 0, 1, "bbbbbbbbbbbb"), _shard(out, "train", 0, 1, None)  # unlisted: removed
    gone = out / (publish.TEMP_PREFIX + "bbbbbbbbbbbb")  # a killed run's staging (no owner: not live)
    gone.mkdir()
    (out / (publish.TEMP_PREFIX + "cccccccccccc.removing")).mkdir()
    temp_dir, rest = publish.prepare_output(str(out), overwrite=True)
    assert sorted(rest) == sorted(live + [layout.METADATA_FILE])
    assert sorted(os.listdir(out)) == sorted(live + [layout.METADATA_FILE, os.path.basename(temp_dir)])
    publish.discard(temp_dir)
    # Without a sidecar, shards of a gone run's generation are left-overs; others need --overwrite.
    (out / layout.METADATA_FILE).unlink()
    (out / (publish.TEMP_PREFIX + "aaaaaaaaaaaa")).mkdir()
    temp_dir, rest = publish.prepare_output(str(out), overwrite=False)
    assert rest == [] and os.listdir(out) == [os.path.basename(temp_dir)]
    publish.discard(temp_dir)
    # A sidecar that does not parse lists nothing we could prove unlisted: every shard stays.
    kept = [_shard(out, "train", 0, 1, "dddddddddddd"), _shard(out, "valid", 0, 1, None)]
    (out / layout.METADATA_FILE).write_text('{"splits": ')
    temp_dir, rest = publish.prepare_output(str(out), overwrite=True)
    assert sorted(rest) == sorted(kept + [layout.METADATA_FILE])
    publish.discard(temp_dir)
    assert sorted(os.listdir(out)) == sorted(kept + [layout.METADATA_FILE])


def test_a_failure_while_moving_shards_in_leaves_the_previous_dataset_whole(tmp_path, class_folder_dataset,
                                                                             monkeypatch):
    """A move that fails after the first shard (quota, permission, a GCS copy): the old dataset stays
    whole and the shards this run moved in are taken out again."""
    from apache_beam.io.filesystems import FileSystems

    out = tmp_path / "out"
    pipeline.run(["--input", class_folder_dataset, "--output", str(out), "--form", "jpeg"])
    before = {p: (out / p).read_bytes() for p in os.listdir(out)}
    rename, moved = FileSystems.rename, []

    def rename_one_shard_then_fail(sources, destinations, *args):
        into_output = [d for d in destinations if os.path.dirname(d) == str(out)
                       and layout.parse_shard_file_name(os.path.basename(d))]
        if not into_output:
            return rename(sources, destinations, *args)  # Beam's own files
        for source, destination in zip(sources, destinations):
            if moved:
                raise OSError(f"quota exceeded writing {destination}")
            rename([source], [destination])
            moved.append(destination)

    monkeypatch.setattr(FileSystems, "rename", staticmethod(rename_one_shard_then_fail))
    with pytest.raises(OSError, match="quota exceeded"):
        pipeline.run(["--input", class_folder_dataset, "--output", str(out), "--form", "jpeg", "--min_shards", "2",
                      "--overwrite"])
    assert len(moved) == 1
    assert {p: (out / p).read_bytes() for p in os.listdir(out)} == before
