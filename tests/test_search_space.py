"""The search-space file shared by local and Vertex AI tuning: the book's default, its
round trip, and errors that name the field (including the book's own YAML mistakes)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from trainer.tuning.search_space import (BOOK_SEARCH_SPACE_YAML, SearchSpaceError, check_against_trainer,
                                  join_flag_values, load_search_space, parse_search_space, to_trial_flags)


def test_default_is_the_books_space_and_fits_the_trainer():
    space = load_search_space(None)
    by_name = {p.name: p for p in space.parameters}
    assert (by_name["l2"].type, by_name["l2"].min, by_name["l2"].max, by_name["l2"].scale) == \
        ("double", 0.0, 0.2, "linear")
    assert by_name["batch_size"].values == (16, 32, 64)
    assert by_name["num_hidden"].values == (8, 16, 24)
    assert by_name["with_color_distort"].values == ("true", "false")
    assert (by_name["crop_ratio"].min, by_name["crop_ratio"].max) == (0.5, 0.8)
    assert (space.metric, space.goal, space.max_trials, space.parallel_trials) == ("accuracy", "maximize", 50, 2)
    check_against_trainer(space)


def test_printed_default_and_to_yaml_round_trip():
    printed = subprocess.run([sys.executable, "-m", "trainer.search_space"], capture_output=True, text=True,
                             check=True).stdout
    assert printed == BOOK_SEARCH_SPACE_YAML
    space = parse_search_space(printed)
    assert parse_search_space(space.to_yaml()) == space


@pytest.mark.parametrize("body, message", [
    # The book's discreteValueSpec held booleans; Vertex takes numbers only there.
    ("parameters:\n  with_color_distort: {type: discrete, values: [false, true]}\n", "type: categorical"),
    ("parameters:\n  l2: {type: double, min: 0.2, max: 0.1}\n", "min < max"),
    ("parameters:\n  lrate: {type: double, min: 0.0, max: 0.1, scale: log}\n", "log scale"),
    ("parameters:\n  l2: {type: double, min: 0, max: 1, step: 2}\n", "unknown keys ['step']"),
    ("budget: 3\nparameters:\n  l2: {type: double, min: 0, max: 1}\n", "unknown keys ['budget']"),
    ("algorithm: grid\nparameters:\n  l2: {type: double, min: 0, max: 1}\n", "grid search needs listed values"),
    ("goal: maximise\nparameters:\n  l2: {type: double, min: 0, max: 1}\n", "goal 'maximise'"),
    ("parameters: {}\n", "non-empty"),
    ("parameters:\n  - l2\n", "non-empty mapping"),
    ("parameters:\n  l2: {type: double, min: 0, max: [1\n", "not valid YAML"),
])
def test_malformed_files_name_the_field(tmp_path, body, message):
    path = tmp_path / "space.yaml"
    path.write_text(body)
    with pytest.raises(SearchSpaceError) as e:
        load_search_space(str(path))
    assert message in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("body, fixed, message", [
    ("parameters:\n  dropout: {type: double, min: 0, max: 1}\n", [], "'dropout' is not a tunable trainer flag"),
    ("parameters:\n  data: {type: categorical, values: [a]}\n", [], "'data' is not a tunable"),
    ("parameters:\n  batch_size: {type: discrete, values: [16, 12.5]}\n", [], "batch_size='12.5' does not parse"),
    ("parameters:\n  model: {type: categorical, values: [dnn, resnet]}\n", [], "'resnet' is not one of"),
    ("parameters:\n  with_flip: {type: categorical, values: [\"maybe\"]}\n", [], "with_flip='maybe'"),
    ("parameters:\n  l2: {type: double, min: 0, max: 1}\n", ["--l2=0.1"], "both tuned and fixed"),
    # Optuna and Vertex would pass 23.7 from this range: every trial would fail on --batch_size.
    ("parameters:\n  batch_size: {type: double, min: 16, max: 64}\n", [],
     "batch_size is a double range [16, 64] but --batch_size takes whole numbers"),
])
def test_spaces_that_do_not_fit_the_trainer_are_refused(body, fixed, message):
    with pytest.raises(SearchSpaceError, match=message.replace("[", r"\[").replace("(", r"\(")):
        check_against_trainer(parse_search_space(body), fixed)


def test_numbers_in_exponent_form_are_numbers():
    # YAML 1.1 (PyYAML) reads 1e-4 as the string "1e-4"; 1.0e-4 is a float.
    space = parse_search_space("parameters:\n  lrate: {type: double, min: 1e-4, max: 1.0e-2, scale: log}\n"
                               "  l2: {type: discrete, values: [0, 1e-3, 1E-2]}\n")
    lrate, l2 = space.parameters
    assert (lrate.min, lrate.max) == (1e-4, 1e-2) and l2.values == (0, 1e-3, 1e-2)
    check_against_trainer(space)
    with pytest.raises(SearchSpaceError, match="needs numeric min and max, got '1e-4x'"):
        parse_search_space("parameters:\n  lrate: {type: double, min: 1e-4x, max: 1.0}\n")


def test_trial_flags_are_written_the_way_vertex_passes_them():
    assert to_trial_flags({"l2": 0.1, "batch_size": 32, "with_flip": "true", "lrate": 1e-05}) == \
        ["--l2=0.1", "--batch_size=32", "--with_flip=true", "--lrate=1e-05"]
    assert join_flag_values(["--num_epochs", "5", "--cache", "--l1=0.1"]) == ["--num_epochs=5", "--cache", "--l1=0.1"]
