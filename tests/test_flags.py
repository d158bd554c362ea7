"""Flags are spelled out: no parser takes an abbreviation, so a prefix of one of our flags can be
another tool's flag (Beam's `--label`, Dataflow's job labels) and reaches it."""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parser_calls_allowing_abbreviations(package: str) -> list[str]:
    """`file:line` of every ArgumentParser(...) or add_parser(...) call under `package` without allow_abbrev=False."""
    found = []
    for folder, _, files in os.walk(os.path.join(REPO, package)):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if called not in ("ArgumentParser", "add_parser"):
                    continue
                if not any(k.arg == "allow_abbrev" and isinstance(k.value, ast.Constant) and k.value.value is False
                           for k in node.keywords):
                    found.append(f"{os.path.relpath(path, REPO)}:{node.lineno}")
    return found


@pytest.mark.parametrize("package", ["etl", "trainer"])
def test_no_parser_takes_abbreviations(package):
    assert parser_calls_allowing_abbreviations(package) == []


def test_a_prefix_of_an_etl_flag_goes_to_beam():
    from etl.options import parse_etl_args

    config, beam_args = parse_etl_args(["--input", "in.csv", "--output", "out", "--label", "team=vision",
                                        "--form", "pixels"])
    assert beam_args == ["--label", "team=vision"]
    assert config.form == "pixels"


def test_the_trainer_refuses_a_prefix_of_its_flags(capsys):
    from trainer.config import parse_config

    with pytest.raises(SystemExit):
        parse_config(["--data", "d", "--job_dir", "j", "--num_epoch", "3"])
    assert "unrecognized arguments: --num_epoch 3" in capsys.readouterr().err
