"""The strategy benchmark: which rows a machine gets (GPU rows only with GPUs), and a row measured
in its own process as the trainer would train (the mirrored row splits the CPU in two)."""
import argparse

import pytest

from tests import trainer_fixtures as fx
from trainer import bench_strategies
from trainer.bench_strategies import RowPlan

ALL = bench_strategies.STRATEGIES


def test_a_cpu_only_machine_gets_logical_cpus_and_local_processes():
    assert bench_strategies.plan_rows(0, ALL, 2) == [
        RowPlan("one_device", "CPU"),
        RowPlan("mirrored", "2 logical CPUs", logical_cpus=2),
        RowPlan("multi_worker", "2 local processes (CPU)", processes=2),
    ]


def test_gpu_rows_appear_when_gpus_exist():
    assert bench_strategies.plan_rows(1, ALL, 2) == [
        RowPlan("one_device", "CPU", visible_gpus=("-1",)),
        RowPlan("one_device", "1 GPU", visible_gpus=("0",)),
        RowPlan("multi_worker", "2 local processes (CPU)", processes=2, visible_gpus=("-1", "-1")),
    ]
    rows = bench_strategies.plan_rows(4, ALL, 2)
    assert [r.devices for r in rows] == ["CPU", "1 GPU", "4 GPUs", "2 local processes x 2 GPU(s)"]
    assert rows[-1].visible_gpus == ("0,1", "2,3")


@pytest.fixture(scope="module")
def pixels_dir(tmp_path_factory):
    images = fx.make_image_files(str(tmp_path_factory.mktemp("images")), per_class=6)
    out = str(tmp_path_factory.mktemp("pixels"))
    fx.write_dataset(out, images, "pixels")
    return out


@pytest.mark.slow
def test_the_mirrored_row_trains_in_its_own_process_over_two_logical_cpus(pixels_dir):
    args = argparse.Namespace(data=pixels_dir, per_replica_batch=2, warmup_epochs=0)
    result = bench_strategies.measure_row(RowPlan("mirrored", "2 logical CPUs", logical_cpus=2), args,
                                          ["--model", "linear", "--image_size", "32"])
    assert (result["strategy"], result["replicas"], result["global_batch"]) == ("mirrored", 2, 4)
    assert result["steps"] == 12 // 4 and result["examples"] == 12 and result["epoch_seconds"] > 0
    table = bench_strategies.format_table([(RowPlan("mirrored", "2 logical CPUs"), result)])
    assert table.splitlines()[2].startswith("| mirrored | 2 logical CPUs | 4 | 3 | ") and table.endswith("| 1.00x |")


def test_flags_the_bench_sets_itself_are_refused(capsys):
    assert bench_strategies.main(["--data", "d", "--batch_size", "64"]) == 2
    assert "the bench sets --batch_size" in capsys.readouterr().err
    assert bench_strategies.main(["--data", "d", "--strategies", "one_device,gpu"]) == 2
    assert "unknown ['gpu']" in capsys.readouterr().err
