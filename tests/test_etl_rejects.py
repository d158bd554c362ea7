"""Bad and messy input: every row is accounted for, each bad one with its reason; nothing crashes."""
import json
import re
import os
import signal
import subprocess
import sys
import time

import pytest
import tensorflow as tf

from etl import pipeline, publish
from shared import layout, schema
from tests import image_factory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_rejects(out_dir):
    with open(os.path.join(out_dir, layout.REJECTS_FILE), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def count_records(out_dir, meta):
    return sum(1 for s in layout.SPLITS for p in meta.shard_paths(str(out_dir), s) for _ in tf.data.TFRecordDataset(p))


def test_each_bad_input_is_rejected_with_its_reason(tmp_path):
    good = image_factory.write_class_folders(str(tmp_path / "in"), classes=("a", "b"), per_class=5)
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    (bad_dir / "text.jpg").write_text("hello, I am not a picture")
    jpeg = image_factory.encode(image_factory.make_image(0, 1, size=(200, 160)), "JPEG")
    (bad_dir / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (bad_dir / "bomb.png").write_bytes(image_factory.png_with_claimed_size(30000, 30000))
    (bad_dir / "big.jpg").write_bytes(jpeg + b"\0" * 300_000)  # over --max_file_mb 0.25
    (bad_dir / "empty.jpg").write_bytes(b"")
    rows = good + [
        (str(bad_dir / "missing.jpg"), "a"),
        (str(bad_dir / "text.jpg"), "a"),
        (str(bad_dir / "truncated.jpg"), "b"),
        (str(bad_dir / "bomb.png"), "b"),
        (str(bad_dir / "big.jpg"), "a"),
        (str(bad_dir / "empty.jpg"), "a"),
        (good[0][0], "zebra"),  # unknown label (the labels file fixes the classes) and a duplicate uri
        (str(bad_dir / "x.jpg"), "a", "extra"),  # malformed: three fields
        (good[1][0], "a"),  # duplicate
        (good[2][0], "A"),  # an unknown label whose line sorts before the known one's: see below
        (good[3][0], "b" if good[3][1] == "a" else "a"),  # two labels the labels file has: both out
    ]
    csv_path = image_factory.write_csv(str(tmp_path / "all.csv"), rows)
    labels = tmp_path / "dict.txt"
    labels.write_text("b\na\n")
    out = tmp_path / "out"
    meta = pipeline.run(["--input", csv_path, "--class_names_file", str(labels), "--output", str(out),
                         "--form", "pixels",
                         "--image_size", "8", "--max_file_mb", "0.25", "--max_reject_fraction", "0.6"])
    rejects = read_rejects(out)
    by_uri = {}
    for r in rejects:
        by_uri.setdefault(os.path.basename(r["uri"]) or r["source"], []).append(r["reason"])
    assert by_uri["missing.jpg"] == ["missing_file"]
    assert by_uri["text.jpg"] == ["not_an_image"]
    assert by_uri["empty.jpg"] == ["not_an_image"]
    assert by_uri["truncated.jpg"] == ["corrupt"]
    assert by_uri["bomb.png"] == ["too_large"]
    assert by_uri["big.jpg"] == ["too_large"]
    assert any(r["reason"] == "malformed_row" and "extra" in r["source"] for r in rejects)
    # The labels file's label wins over an unknown one (which sorts first, and used to be kept and
    # then rejected, losing the image); one uri with two known labels is kept under neither.
    dup_reasons = sorted(reason for r in rejects if r["uri"] in (good[0][0], good[1][0]) for reason in [r["reason"]])
    assert dup_reasons == ["duplicate", "duplicate"], rejects
    assert [(r["reason"], r["label"]) for r in rejects if r["uri"] == good[2][0]] == [("duplicate", "A")]
    assert [r["reason"] for r in rejects if r["uri"] == good[3][0]] == ["conflicting_labels"] * 2
    assert "labels ['a', 'b']" in next(r["detail"] for r in rejects if r["uri"] == good[3][0])
    for r in rejects:
        assert set(r) >= {"uri", "label", "reason", "detail"} and r["detail"]
    # Accounting: every input row is a record or a reject.
    assert count_records(out, meta) + len(rejects) == len(rows)
    assert meta.extra["rejected"]["count"] == len(rejects)
    assert meta.extra["input"]["num_rows"] == len(rows)
    assert meta.class_names == ("b", "a"), "the labels file fixes the class order"
    assert sum(meta.extra["rejected"]["by_reason"].values()) == len(rejects)


def test_unknown_label_is_rejected(tmp_path):
    rows = image_factory.write_class_folders(str(tmp_path / "in"), classes=("a", "b"), per_class=3)
    labels = tmp_path / "dict.txt"
    labels.write_text("a\n")
    out = tmp_path / "out"
    pipeline.run(["--input", image_factory.write_csv(str(tmp_path / "all.csv"), rows),
                  "--class_names_file", str(labels), "--output", str(out), "--form", "jpeg"])
    rejects = read_rejects(out)
    assert sorted(r["reason"] for r in rejects) == ["unknown_label"] * 3
    assert all(r["label"] == "b" for r in rejects)


def test_messy_csv(tmp_path):
    """Quoted comma in a path, CRLF, blank lines, a header row, spaces and non-ASCII in names."""
    root = tmp_path / "in"
    odd_dir = root / "fleur d'été"
    odd_dir.mkdir(parents=True)
    names = ["a, b.jpg", "näive space.jpg", "日本.jpg"]
    for i, name in enumerate(names):
        image_factory.make_image(i, i).save(odd_dir / name, format="JPEG")
    csv_path = tmp_path / "all.csv"
    lines = ["image,label", '"in/fleur d\'été/a, b.jpg",rosé', "", f"in/fleur d'été/{names[1]}, rosé", "   ",
             f"in/fleur d'été/{names[2]},tulipe"]
    csv_path.write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-8"))
    out = tmp_path / "out"
    meta = pipeline.run(["--input", str(csv_path), "--output", str(out), "--form", "jpeg"])
    assert read_rejects(out) == []
    assert meta.class_names == ("rosé", "tulipe")
    assert sum(meta.splits[s].num_examples for s in layout.SPLITS) == 3
    uris = set()
    for s in layout.SPLITS:
        for p in meta.shard_paths(str(out), s):
            uris |= {schema.decode_example(meta.features, r.numpy())["uri"] for r in tf.data.TFRecordDataset(p)}
    assert uris == {str(odd_dir / n) for n in names}


def test_too_many_rejects_publishes_nothing(tmp_path):
    rows = image_factory.write_class_folders(str(tmp_path / "in"), classes=("a",), per_class=2)
    rows += [(str(tmp_path / f"missing{i}.jpg"), "a") for i in range(3)]
    out = tmp_path / "out"
    with pytest.raises(publish.TooManyRejectsError, match=r"3 of 5 inputs \(60.0%\).*--max_reject_fraction 0.5") as e:
        pipeline.run(["--input", image_factory.write_csv(str(tmp_path / "all.csv"), rows), "--output", str(out),
                      "--form", "jpeg", "--max_reject_fraction", "0.5"])
    assert str(e.value).endswith(f"Every reject, with its reason: {out / layout.REJECTS_FILE}")
    assert sorted(os.listdir(out)) == [layout.REJECTS_FILE], "only the list of rejects, so the user can see why"
    assert len(read_rejects(out)) == 3


def test_cli_reports_a_non_empty_output_clearly(tmp_path, class_folder_dataset):
    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("x")
    proc = subprocess.run([sys.executable, "-m", "etl", "--input", class_folder_dataset, "--output", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "is not empty" in proc.stderr and "--overwrite" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_killed_run_publishes_nothing_and_the_next_run_recovers(tmp_path):
    root = tmp_path / "in"
    image_factory.write_class_folders(str(root), classes=("a", "b"), per_class=150, size=(160, 120))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "etl", "--input", str(root), "--output", str(out), "--form", "pixels",
           "--image_size", "96", "--shard_mb", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    staging = []
    while time.time() < deadline and proc.poll() is None:
        staging = [n for n in os.listdir(out) if n.startswith(publish.TEMP_PREFIX)] if out.exists() else []
        written = out / staging[0] / "written" if staging else None  # pixels: each shard written once, there
        if written and written.is_dir() and os.listdir(written):
            break  # records are being written
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make the input larger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert layout.METADATA_FILE not in os.listdir(out)
    assert not any(layout.parse_shard_file_name(n) for n in os.listdir(out)), "no shard may be published"
    # Rerunning the same command (no --overwrite) removes the left-over and completes.
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    assert (out / layout.METADATA_FILE).exists()
    assert not any(n.startswith(publish.TEMP_PREFIX) for n in os.listdir(out))


def test_a_conversion_failure_is_said_once():
    from etl.records import LoadImage
    from shared import image_check

    gif = image_factory.encode(image_factory.make_image(0, 1, size=(60, 40)).convert("P"), "GIF")
    truncated = gif[: len(gif) // 2]
    load = LoadImage("pixels", (80, 10, 10), 40_000_000, 2**20, 95)
    with pytest.raises(image_check.ImageRejected) as e:
        load._canonical_bytes(truncated, image_check.read_header(truncated))
    assert e.value.detail.count("cannot convert GIF") == 1, e.value.detail


def test_a_fifo_among_the_inputs_is_rejected_not_waited_on(tmp_path):
    root = tmp_path / "g[1]"  # glob characters in the input folder's name are not a pattern
    image_factory.write_class_folders(str(root), classes=("a", "b"), per_class=3)
    os.mkfifo(root / "a" / "pipe.jpg")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "etl", "--input", str(root), "--output", str(out), "--form", "jpeg"],
                          cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    [reject] = read_rejects(out)
    assert reject["uri"].endswith("pipe.jpg") and reject["reason"] == "read_error"
    assert reject["detail"] == "not a regular file (a FIFO or pipe)"


def test_a_labels_path_that_is_a_folder_or_not_utf8_is_named(tmp_path, class_folder_dataset):
    latin1 = tmp_path / "labels.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    for labels, message in [(tmp_path, f"{tmp_path}: cannot read it"), (latin1, f"{latin1} is not UTF-8 text")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            pipeline.run(["--input", class_folder_dataset, "--class_names_file", str(labels),
                          "--output", str(tmp_path / "o")])


def test_local_paths_are_stored_absolute_for_the_trainer(tmp_path, monkeypatch, class_folder_dataset):
    from etl.options import parse_etl_args

    (tmp_path / "module").mkdir()
    monkeypatch.chdir(tmp_path)
    config, _ = parse_etl_args(["--input", os.path.relpath(class_folder_dataset), "--output", "out",
                                "--form", "embeddings", "--embedding_module", "module"])
    assert config.embedding_module == str(tmp_path / "module") and config.input == class_folder_dataset


def test_help_shows_every_flags_default():
    from etl.options import make_arg_parser

    text = make_arg_parser().format_help()
    flags = re.split(r"\n  (?=-)", text.split("options:", 1)[1])[1:]  # one block per flag, wrapped lines included
    silent = [f.split()[0] for f in flags if "(default:" not in f and not f.startswith(("-h", "--input", "--output"))]
    assert not silent, f"--help gives no default for {silent}"
    words = " ".join(text.split())
    assert "(default: jpeg)" in words and "(default: 224)" in words


def test_header_rows_are_told_from_data_rows_and_a_latin1_line_is_one_reject(tmp_path):
    import gzip

    good = image_factory.write_class_folders(str(tmp_path / "in"), classes=("cat", "category"), per_class=3)
    # First row: an image whose class happens to be called "category"; it is data, not a header.
    data_first = image_factory.write_csv(str(tmp_path / "data_first.csv"),
                                         sorted(good, key=lambda r: r[1] != "category"))
    meta = pipeline.run(["--input", data_first, "--output", str(tmp_path / "a"), "--form", "jpeg"])
    assert count_records(tmp_path / "a", meta) == 6 and meta.class_names == ("cat", "category")
    # A header with names the ETL does not know, gzipped: still a header, not a row or a class.
    text = "filepath,species\n" + "".join(f"{path},{label}\n" for path, label in good)
    (tmp_path / "rows.csv.gz").write_bytes(gzip.compress(text.encode()))
    meta = pipeline.run(["--input", str(tmp_path / "rows.csv.gz"), "--output", str(tmp_path / "b"), "--form", "jpeg"])
    assert meta.class_names == ("cat", "category") and meta.extra["input"]["num_rows"] == 6
    # One Latin-1 line: that row is rejected; the job goes on.
    latin1 = "".join(f"{path},{label}\n" for path, label in good).encode() + "caf\xe9.jpg,cat\n".encode("latin-1")
    (tmp_path / "latin1.csv").write_bytes(latin1)
    meta = pipeline.run(["--input", str(tmp_path / "latin1.csv"), "--output", str(tmp_path / "c"), "--form", "jpeg"])
    [reject] = read_rejects(tmp_path / "c")
    assert reject["reason"] == "malformed_row" and "not UTF-8 (byte b'\\xe9'" in reject["detail"]
    assert count_records(tmp_path / "c", meta) == 6


def test_a_live_runs_staging_folder_is_not_deleted_under_it(tmp_path, class_folder_dataset):
    """A staging folder whose owner process is alive (another run to the same --output) is refused,
    with --overwrite too, not removed as a left-over; once that process is gone, it is a left-over."""
    import json as json_lib
    import socket

    out = tmp_path / "out"
    staging = out / (publish.TEMP_PREFIX + "0123456789ab")
    staging.mkdir(parents=True)
    (staging / "records-00000.part").write_bytes(b"being written")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (staging / publish.OWNER_FILE).write_text(json_lib.dumps({"host": socket.gethostname(), "pid": other.pid}))
        for overwrite in ([], ["--overwrite"]):
            with pytest.raises(publish.OutputNotEmptyError, match=f"another ETL run is writing .*process {other.pid}"):
                pipeline.run(["--input", class_folder_dataset, "--output", str(out), "--form", "jpeg", *overwrite])
            assert (staging / "records-00000.part").read_bytes() == b"being written"
            assert os.listdir(out) == [staging.name], "a refused run leaves nothing behind"
    finally:
        other.kill()
        other.wait()
    pipeline.run(["--input", class_folder_dataset, "--output", str(out), "--form", "jpeg"])
    assert not staging.exists() and (out / layout.METADATA_FILE).exists()


def test_symlinked_class_folders_and_broken_links_are_inputs(tmp_path):
    """A class folder linked in from elsewhere is a class, and a dangling link a missing_file reject:
    Beam's match (os.walk) skipped both without a word, so a class could vanish from the dataset."""
    from etl import inputs

    root = tmp_path / "images"
    image_factory.write_class_folders(str(root), classes=("cat",), per_class=2)
    image_factory.write_class_folders(str(tmp_path / "elsewhere"), classes=("dog",), per_class=3)
    (root / "dog").symlink_to(tmp_path / "elsewhere" / "dog", target_is_directory=True)
    (root / "cat" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    rows = inputs.list_class_folders(str(root))
    assert [r.source for r in rows] == ["cat/000.jpg", "cat/001.jpg", "cat/gone.jpg",
                                        "dog/000.jpg", "dog/001.jpg", "dog/002.jpg"]
    assert rows[3].uri == str(root / "dog" / "000.jpg") and rows[3].label == "dog"


def test_a_name_with_a_unicode_line_separator_is_one_reject(tmp_path):
    """U+0085 (NEL, common in names mis-decoded from cp1252) and U+2028 are line breaks to str.splitlines;
    a rejected file so named cut its line of the staged rejects in two and failed the run."""
    root = tmp_path / "in"
    image_factory.write_class_folders(str(root), classes=("a", "b"), per_class=3)
    names = ["caf\u0085.jpg", "x\u2028y.jpg"]
    for name in names:
        (root / "a" / name).write_text("not a picture")
    out = tmp_path / "out"
    meta = pipeline.run(["--input", str(root), "--output", str(out), "--form", "jpeg"])
    assert sorted((os.path.basename(r["uri"]), r["reason"]) for r in read_rejects(out)) == \
        sorted((name, "not_an_image") for name in names)
    assert count_records(out, meta) == 6


def test_images_in_folders_inside_a_class_folder_are_that_class(tmp_path):
    """`cat/2019/x.jpg` is a cat; only `*/*` was listed, so nested images were neither records nor
    rejects (and a class held only in such folders vanished). A link back up is not followed twice."""
    root = tmp_path / "images"
    image_factory.write_class_folders(str(root), classes=("cat", "dog"), per_class=1)
    image_factory.write_class_folders(str(root / "cat"), classes=("2019",), per_class=2)
    image_factory.write_class_folders(str(root / "owl"), classes=("a",), per_class=1)
    image_factory.write_class_folders(str(root / "owl" / ".thumbs"), classes=("x",), per_class=1)
    (root / "owl" / "a" / "loop").symlink_to(root / "owl", target_is_directory=True)
    out = tmp_path / "out"
    meta = pipeline.run(["--input", str(root), "--output", str(out), "--form", "jpeg"])
    assert meta.class_names == ("cat", "dog", "owl")
    assert meta.extra["input"]["num_rows"] == 5 and count_records(out, meta) == 5


def test_glob_characters_in_the_csv_path_and_the_output(tmp_path):
    """Beam reads and writes by pattern: a CSV in "flowers [v2]/" matched no file and failed the run,
    and an --output "out[1]" failed at the end with a BeamIOError and a left-over staging folder."""
    folder = tmp_path / "flowers [v2]"
    rows = image_factory.write_class_folders(str(folder), classes=("a", "b"), per_class=2)
    csv_path = image_factory.write_csv(str(folder / "all*.csv"), rows)
    meta = pipeline.run(["--input", csv_path, "--output", str(tmp_path / "out"), "--form", "jpeg"])
    assert count_records(tmp_path / "out", meta) == 4
    with pytest.raises(publish.OutputNotEmptyError, match=re.escape("has a glob character (* ? [)")):
        pipeline.run(["--input", csv_path, "--output", str(tmp_path / "out[1]"), "--form", "jpeg"])
    assert not (tmp_path / "out[1]").exists()


def test_a_class_folder_reject_names_its_file_under_the_root(tmp_path, class_folder_dataset):
    """README: `source` is the CSV line as read, or the file's path under the class-folder root; a
    folder input gave the line of the CSV the driver writes for it ("/abs/path/cat/x.jpg,cat")."""
    with open(os.path.join(class_folder_dataset, "cat", "notes, v2.jpg"), "w") as f:
        f.write("not a picture")
    out = tmp_path / "out"
    pipeline.run(["--input", class_folder_dataset, "--output", str(out), "--form", "jpeg"])
    [reject] = read_rejects(out)
    assert (reject["source"], reject["reason"]) == ("cat/notes, v2.jpg", "not_an_image")
    assert reject["uri"] == os.path.join(class_folder_dataset, "cat", "notes, v2.jpg")


def test_a_dangling_link_first_in_a_class_folder_input_is_a_reject_not_a_header(tmp_path):
    root = tmp_path / "images"
    image_factory.write_class_folders(str(root), classes=("cat", "dog"), per_class=2)
    (root / "cat" / "0").symlink_to(tmp_path / "nowhere")  # sorts first; no extension, as a header's path
    out = tmp_path / "out"
    meta = pipeline.run(["--input", str(root), "--output", str(out), "--form", "jpeg"])
    assert [(r["source"], r["reason"]) for r in read_rejects(out)] == [("cat/0", "missing_file")]
    assert meta.extra["input"]["num_rows"] == 5


def test_a_file_name_that_is_not_utf8_in_a_class_folder_is_one_reject(tmp_path):
    """b"caf\\xe9.jpg" (a Latin-1 name from an old archive) failed the whole run with "'utf-8' codec can't
    encode character '\\udce9'", naming no file; as a CSV line that is not UTF-8, it is one malformed_row."""
    root = tmp_path / "images"
    image_factory.write_class_folders(str(root), classes=("cat", "dog"), per_class=2)
    with open(os.path.join(os.fsencode(root), b"cat", b"caf\xe9.jpg"), "wb") as f:
        f.write(image_factory.encode(image_factory.make_image(0, 5)))
    out = tmp_path / "out"
    meta = pipeline.run(["--input", str(root), "--output", str(out), "--form", "jpeg"])
    [reject] = read_rejects(out)
    assert reject["reason"] == "malformed_row" and "not UTF-8 (byte b'\\xe9'" in reject["detail"]
    assert count_records(out, meta) == 4 and meta.extra["input"]["num_rows"] == 5
    assert reject["source"] == "cat/caf\ufffd.jpg"  # the file under the root, as for every folder-input reject


@pytest.mark.parametrize("before", ["\r\n  \r\n", "\n\ufeff"], ids=["blank_lines", "blank_line_then_bom"])
def test_a_header_after_blank_lines_is_still_a_header(tmp_path, before):
    """Only the first line was looked at: after a blank one, "path,label" became a missing_file row
    and "label" a class of the dataset (one more output unit, and indices shifted). With a BOM after
    the blank line, the header was taken as "\\ufeffpath,label", which the row parser (it drops a BOM
    on any line) never matched."""
    rows = image_factory.write_class_folders(str(tmp_path / "in"), classes=("cat", "dog"), per_class=2)
    text = before + "path,label\r\n" + "".join(f"{path},{label}\r\n" for path, label in rows)
    (tmp_path / "rows.csv").write_text(text, encoding="utf-8", newline="")
    out = tmp_path / "out"
    meta = pipeline.run(["--input", str(tmp_path / "rows.csv"), "--output", str(out), "--form", "jpeg"])
    assert meta.class_names == ("cat", "dog") and read_rejects(out) == []
    assert meta.extra["input"]["num_rows"] == 4


def test_a_class_folder_file_name_ending_in_a_space_is_read_as_named(tmp_path):
    """The driver's CSV line for "cat/000.jpg " was stripped like a hand-written one: the file became
    "cat/000.jpg", a duplicate of another image (or a missing_file reject when there is none)."""
    root = tmp_path / "images"
    image_factory.write_class_folders(str(root), classes=("cat", "dog"), per_class=1)
    image_factory.make_image(0, 99).save(root / "cat" / "000.jpg ", format="JPEG")
    out = tmp_path / "out"
    meta = pipeline.run(["--input", str(root), "--output", str(out), "--form", "jpeg"])
    assert read_rejects(out) == []
    uris = {schema.decode_example(meta.features, r.numpy())["uri"]
            for s in layout.SPLITS for p in meta.shard_paths(str(out), s) for r in tf.data.TFRecordDataset(p)}
    assert uris == {str(root / "cat" / "000.jpg"), str(root / "cat" / "000.jpg "), str(root / "dog" / "000.jpg")}


def test_a_link_in_a_loop_in_a_class_folder_is_one_reject(tmp_path):
    """A link to itself ("cat/x.jpg -> x.jpg") raised ELOOP while the driver listed the folders: the
    whole run failed with "cannot list it", where a dangling link is one missing_file reject."""
    root = tmp_path / "images"
    image_factory.write_class_folders(str(root), classes=("cat", "dog"), per_class=2)
    (root / "cat" / "x.jpg").symlink_to("x.jpg")
    (root / "loop").symlink_to("loop")  # beside the class folders, like a dangling link there: not a class
    out = tmp_path / "out"
    meta = pipeline.run(["--input", str(root), "--output", str(out), "--form", "jpeg"])
    assert [r["source"] for r in read_rejects(out)] == ["cat/x.jpg"]
    assert meta.class_names == ("cat", "dog") and count_records(out, meta) == 4
