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


def test_labels_is_the_class_names_file_only_when_it_names_a_file_and_beams_job_labels_otherwise(tmp_path):
    from etl.options import parse_etl_args

    names = tmp_path / "dict.txt"
    names.write_text("cat\ndog\n")
    base = ["--input", "in.csv", "--output", "out"]
    config, beam_args = parse_etl_args(base + ["--class_names_file", str(names)])
    assert (config.class_names_file, beam_args) == (str(names), [])
    # The old spelling, for an existing file: the class names file, in either form.
    for old in (["--labels", str(names)], [f"--labels={names}"]):
        config, beam_args = parse_etl_args(base + old + ["--labels", "team=vision", "--labels={\"data\": \"digits\"}"])
        assert config.class_names_file == str(names), old
        assert beam_args == ["--labels", "team=vision", "--labels={\"data\": \"digits\"}"], old


@pytest.mark.parametrize("argv, message", [
    (["--labels", "{tmp}/missing.txt"], "--labels {tmp}/missing.txt is neither an existing file"),
    (["--labels", "{tmp}"], "--labels {tmp} is neither an existing file"),
    (["--labels", "team"], "Dataflow job labels are key=value"),
    (["--labels", "{tmp}/dict.txt", "--class_names_file", "{tmp}/dict.txt"], "give the class names file once"),
])
def test_an_ambiguous_labels_flag_is_refused(tmp_path, capsys, argv, message):
    from etl.options import parse_etl_args

    (tmp_path / "dict.txt").write_text("cat\n")
    with pytest.raises(SystemExit) as e:
        parse_etl_args(["--input", "in.csv", "--output", "out"] + [a.format(tmp=tmp_path) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in err and "--class_names_file" in err
