"""The serving benchmark runs end to end against real server subprocesses and prints every row.

Its ratios (batching on against off, the server's own CPU against the model's) are measured by
running the tool on an idle machine, not asserted here: CI shares its 2 cores with other tests.
"""
import re

import pytest

from tests.serving_fixtures import test_export  # noqa: F401
from trainer.serving import bench as bench_serve
from trainer.serving import bench_client

pytestmark = pytest.mark.slow


def test_bench_measures_every_row_against_the_right_server_and_prints_what_it_returns(test_export, tmp_path, capsys):
    # --thread_spinning: this process already runs TensorFlow, so its pools can no longer stop spinning.
    log = tmp_path / "server.log"
    results = bench_serve.run(["--model", test_export, "--seconds", "0.2", "--repeats", "1", "--callers", "1",
                               "--thread_spinning", "--server_log", str(log)])
    out = capsys.readouterr().out
    assert out.count("\n| ") == (1 + 2) + (1 + 2) + (1 + 6)  # three tables: a header and their rows
    # The two servers are what their rows say they are.
    assert "BatchingOptions(max_batch_size=32" in log.read_text()
    assert "batching off" in (tmp_path / "server.log.batching_off").read_text()
    for clients in (1, 4, 16):
        for mode in ("on", "off"):
            assert results[f"images_per_s_{mode}_{clients}"] > 0
            assert results[f"p99_ms_{mode}_{clients}"] >= results[f"p50_ms_{mode}_{clients}"] > 0
    # The printed ratios are the returned ones, plainly, without goal bookkeeping.
    assert f"batching on gives {results['batching_gain']:.2f}x the images/s of batching off" in out
    assert results["batching_ceiling"] == pytest.approx(results["in-process_32_1"] / results["images_per_s_off_16"])
    assert f"{results['p50_added_ms_1']:+.2f} ms" in out
    assert results["model_batching_gain"] == pytest.approx(results["in-process_32_1"] / results["in-process_1_1"], rel=1e-9)
    assert (f"batch 32 takes {results['model_batching_cpu_gain']:.2f}x less CPU per image than batch 1 "
            f"({results['model_batching_gain']:.2f}x the images/s)") in out
    assert f"{results['server_own_cpu_share_1']:.1%} of the model's" in out
    assert not re.search(r"\b(met|goal)\b", out, re.IGNORECASE)
    # The breakdown comes from the server's Server-Timing header, so it must agree with what the
    # client saw: each round trip contains the handler's time, which contains the model call.
    for batch in (1, 32):
        assert results[f"round_trip_ms_{batch}_1"] >= results[f"total_ms_{batch}_1"]
        assert results[f"total_ms_{batch}_1"] > results[f"model_ms_{batch}_1"] > 0
        assert results[f"read_ms_{batch}_1"] > 0 and results[f"parse_ms_{batch}_1"] > 0
    assert results["model_ms_32_1"] > results["model_ms_1_1"]  # 32 images cost the model more than one
    assert results["parse_ms_32_1"] > results["parse_ms_1_1"]


def test_a_row_of_slow_calls_still_makes_enough_calls_for_a_rate():
    import time

    calls, elapsed = bench_serve.time_loop(lambda: time.sleep(0.02), seconds=0.01, min_calls=5)
    assert calls == 5 and elapsed >= 0.1
    calls, elapsed = bench_serve.time_loop(lambda: None, seconds=0.05, min_calls=5)
    assert calls > 5 and elapsed >= 0.05


def test_synthetic_images_are_photo_sized_jpegs():
    images = bench_serve.make_synthetic_jpegs(3)
    assert len(set(images)) == 3 and all(i[:3] == b"\xff\xd8\xff" for i in images)
    assert 10_000 < sum(map(len, images)) / 3 < 40_000


def _answering(*pieces: bytes, close: bool = False):
    """A socket whose peer sends `pieces` 20 ms apart, so each arrives in its own recv (then closes,
    if `close`): what read_response reads. Returns (our socket, the sending thread)."""
    import socket
    import threading
    import time

    ours, theirs = socket.socketpair()

    def send():
        for piece in pieces:
            theirs.sendall(piece)
            time.sleep(0.02)
        if close:
            theirs.close()
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    return ours, sender


def test_load_generator_reads_a_response_split_anywhere_and_refuses_what_it_cannot_read():
    body = b'{"predictions": [1]}'
    response = (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nServer-Timing: model;dur=1.5\r\n\r\n" % len(body)) + body
    ours, _sender = _answering(response[:10], response[10:-5], response[-5:], close=True)  # split mid-header, mid-body
    status, headers, answer = bench_client.read_response(ours)
    assert (status, headers["server-timing"], answer) == (200, "model;dur=1.5", body)

    ours, _sender = _answering(response[:-5], close=True)  # the server closes 5 bytes short
    with pytest.raises(ConnectionError, match=f"{len(body) - 5} of {len(body)} body bytes"):
        bench_client.read_response(ours)

    ours, _sender = _answering(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    with pytest.raises(ValueError, match="no Content-Length"):
        bench_client.read_response(ours)

    ours, _sender = _answering(b"SSH-2.0-OpenSSH_9.6\r\nContent-Length: 0\r\n\r\n")  # not an HTTP server
    with pytest.raises(ValueError, match="not an HTTP status line: 'SSH-2.0"):
        bench_client.read_response(ours)


def test_the_servers_own_cpu_share_pairs_each_repeat_with_its_own_in_process_row():
    # The VM is 50% slower in the second repeat for both rows, and in the third only while the server's
    # row runs. Paired, the share is 10%, 10% and 65%: median 10%. The medians taken apart would mix
    # a fast repeat of one row with a slow one of the other: 65%.
    served, own = ("batching on", 32, 1), ("in-process", 32, 1)
    runs = {served: [bench_serve.Rate(1, 0.4, 11.0), bench_serve.Rate(1, 0.4, 16.5), bench_serve.Rate(1, 0.4, 16.5)],
            own: [bench_serve.Rate(1, 10.0, None), bench_serve.Rate(1, 15.0, None), bench_serve.Rate(1, 10.0, None)]}
    report = bench_serve.Report(runs, repeats=3)
    assert report.own_cpu_share(served, own) == pytest.approx(0.10)
    assert report.median(served, "server_cpu_ms") / report.median(own, "here_cpu_ms") - 1 == pytest.approx(0.65)
