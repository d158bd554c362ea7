"""The hyperparameter search space: one YAML file for local tuning (optuna) and Vertex AI.

The format mirrors Vertex AI's StudySpec with lower-case names, so each entry maps onto one
`ParameterSpec` and one optuna distribution:

    metric: accuracy            # the hypertune tag; locally, val_accuracy of the exported weights
    goal: maximize              # maximize | minimize
    algorithm: bayesian         # bayesian | grid | random
    max_trials: 50
    parallel_trials: 2
    early_stopping: true        # prune trials whose per-epoch accuracy trails the median
    parameters:
      l2: {type: double, min: 0.0, max: 0.2, scale: linear}
      batch_size: {type: discrete, values: [16, 32, 64]}
      with_color_distort: {type: categorical, values: ["true", "false"]}

Types: `double` and `integer` take min/max and scale (linear | log); `discrete` takes numbers;
`categorical` takes strings. Every name must be a flag of `python -m trainer.train`, and every
value must parse with that flag's type: `check_against_trainer` enforces both.

`python -m trainer.search_space > search.yaml` writes the default (the book's space) to edit.
"""
from __future__ import annotations

import dataclasses
import math
import re
import sys
from typing import Any, Mapping, Sequence

import yaml

PARAMETER_TYPES = ("double", "integer", "discrete", "categorical")
SCALES = ("linear", "log")
GOALS = ("maximize", "minimize")
ALGORITHMS = ("bayesian", "grid", "random")

# The book's search space (chapter 7, "Hyperparameter tuning"), fixed where its YAML was wrong:
# with_color_distort is categorical ("true"/"false" strings, as the trainer parses booleans);
# Vertex's discreteValueSpec only holds numbers, so the book's `False`/`True` there was invalid.
BOOK_SEARCH_SPACE_YAML = """\
# The book's search space (chapter 7). Edit and pass with --search_space.
metric: accuracy
goal: maximize
algorithm: bayesian
max_trials: 50
parallel_trials: 2
early_stopping: true
parameters:
  l2: {type: double, min: 0.0, max: 0.2, scale: linear}
  batch_size: {type: discrete, values: [16, 32, 64]}
  num_hidden: {type: discrete, values: [8, 16, 24]}
  with_color_distort: {type: categorical, values: ["true", "false"]}
  crop_ratio: {type: double, min: 0.5, max: 0.8, scale: linear}
"""


# PyYAML reads YAML 1.1, where a number in exponent form without a dot (1e-4) is a string.
_EXPONENT_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _number(value: Any) -> Any:
    """`"1e-4"` as YAML 1.1 leaves it -> 0.0001; anything else unchanged (and checked by the caller)."""
    return float(value) if isinstance(value, str) and _EXPONENT_NUMBER.match(value) else value


class SearchSpaceError(ValueError):
    """The search-space file is malformed; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class Parameter:
    name: str  # a trainer flag without the dashes, e.g. "batch_size"
    type: str  # one of PARAMETER_TYPES
    min: float | None = None  # double and integer only
    max: float | None = None
    scale: str = "linear"  # double and integer only
    values: tuple[Any, ...] = ()  # discrete (numbers) and categorical (strings) only

    def grid_values(self) -> tuple[Any, ...]:
        """The values a grid search visits; a double range has none (no grid over a continuum)."""
        if self.type == "integer":
            return tuple(range(int(self.min), int(self.max) + 1))
        if self.type == "double":
            raise SearchSpaceError(
                f"parameter {self.name!r} is a double range [{self.min}, {self.max}]: a grid search "
                f"needs listed values; make it `type: discrete, values: [...]`")
        return self.values


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    parameters: tuple[Parameter, ...]
    metric: str = "accuracy"
    goal: str = "maximize"
    algorithm: str = "bayesian"
    max_trials: int = 50
    parallel_trials: int = 2
    early_stopping: bool = True

    def grid_size(self) -> int:
        return math.prod(len(p.grid_values()) for p in self.parameters)

    def grid(self) -> dict[str, list[Any]]:
        return {p.name: list(p.grid_values()) for p in self.parameters}

    def to_dict(self) -> dict[str, Any]:
        params = {}
        for p in self.parameters:
            if p.type in ("double", "integer"):
                params[p.name] = {"type": p.type, "min": p.min, "max": p.max, "scale": p.scale}
            else:
                params[p.name] = {"type": p.type, "values": list(p.values)}
        fields = dataclasses.asdict(self)
        fields["parameters"] = params
        return fields

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _parse_parameter(name: str, spec: Any, where: str) -> Parameter:
    if not isinstance(spec, Mapping):
        raise SearchSpaceError(f"{where}: parameter {name!r} must be a mapping, got {spec!r}")
    kind = spec.get("type")
    if kind not in PARAMETER_TYPES:
        raise SearchSpaceError(f"{where}: parameter {name!r} has type {kind!r}; expected one of {PARAMETER_TYPES}")
    allowed = {"type", "min", "max", "scale"} if kind in ("double", "integer") else {"type", "values"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise SearchSpaceError(f"{where}: parameter {name!r} ({kind}) has unknown keys {unknown}; allowed: {sorted(allowed)}")
    if kind in ("double", "integer"):
        lo, hi, scale = _number(spec.get("min")), _number(spec.get("max")), spec.get("scale", "linear")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)):
            raise SearchSpaceError(f"{where}: parameter {name!r} needs numeric min and max, got {lo!r}, {hi!r}")
        if kind == "integer" and not (float(lo).is_integer() and float(hi).is_integer()):
            raise SearchSpaceError(f"{where}: integer parameter {name!r} needs whole min and max, got {lo}, {hi}")
        if not lo < hi:
            raise SearchSpaceError(f"{where}: parameter {name!r} needs min < max, got {lo} >= {hi}")
        if scale not in SCALES:
            raise SearchSpaceError(f"{where}: parameter {name!r} has scale {scale!r}; expected one of {SCALES}")
        if scale == "log" and lo <= 0:
            raise SearchSpaceError(f"{where}: parameter {name!r} has a log scale, so min must be > 0, got {lo}")
        return Parameter(name, kind, min=lo, max=hi, scale=scale)
    values = spec.get("values")
    if not isinstance(values, list) or not values:
        raise SearchSpaceError(f"{where}: parameter {name!r} needs a non-empty `values` list, got {values!r}")
    if kind == "discrete":
        values = [_number(v) for v in values]
    if len(set(values)) != len(values):
        raise SearchSpaceError(f"{where}: parameter {name!r} repeats values: {values}")
    if kind == "discrete" and not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise SearchSpaceError(
            f"{where}: discrete parameter {name!r} takes numbers only (Vertex AI's rule), got {values}; "
            f"use `type: categorical` with strings such as \"true\"/\"false\"")
    if kind == "categorical" and not all(isinstance(v, str) for v in values):
        raise SearchSpaceError(
            f"{where}: categorical parameter {name!r} takes strings only, got {values}; quote them (\"true\")")
    if kind == "discrete":
        values = sorted(values)  # Vertex requires discrete values in increasing order
    return Parameter(name, kind, values=tuple(values))


def parse_search_space(text: str, where: str = "<search space>") -> SearchSpace:
    """Parses and validates a search-space YAML text; errors name `where` and the field."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SearchSpaceError(f"{where}: not valid YAML: {e}") from e
    if not isinstance(raw, Mapping):
        raise SearchSpaceError(f"{where}: expected a mapping at the top, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(SearchSpace)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SearchSpaceError(f"{where}: unknown keys {unknown}; allowed: {sorted(known)}")
    params_raw = raw.get("parameters")
    if not isinstance(params_raw, Mapping) or not params_raw:
        raise SearchSpaceError(f"{where}: `parameters` must be a non-empty mapping of flag name to spec")
    parameters = tuple(_parse_parameter(str(n), s, where) for n, s in params_raw.items())
    fields = {k: v for k, v in raw.items() if k != "parameters"}
    space = SearchSpace(parameters=parameters, **fields)
    if space.goal not in GOALS:
        raise SearchSpaceError(f"{where}: goal {space.goal!r}; expected one of {GOALS}")
    if space.algorithm not in ALGORITHMS:
        raise SearchSpaceError(f"{where}: algorithm {space.algorithm!r}; expected one of {ALGORITHMS}")
    for key in ("max_trials", "parallel_trials"):
        value = getattr(space, key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise SearchSpaceError(f"{where}: {key} must be a positive integer, got {value!r}")
    if not isinstance(space.early_stopping, bool):
        raise SearchSpaceError(f"{where}: early_stopping must be true or false, got {space.early_stopping!r}")
    if not isinstance(space.metric, str) or not space.metric:
        raise SearchSpaceError(f"{where}: metric must be a non-empty string, got {space.metric!r}")
    if space.algorithm == "grid":
        try:
            space.grid_size()
        except SearchSpaceError as e:
            raise SearchSpaceError(f"{where}: algorithm grid: {e}") from None
    return space


def load_search_space(path: str | None) -> SearchSpace:
    """The space in `path`, or the book's space when `path` is None."""
    if path is None:
        return parse_search_space(BOOK_SEARCH_SPACE_YAML, "<book default>")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise SearchSpaceError(f"cannot read search space {path}: {e}") from e
    return parse_search_space(text, path)


def format_flag_value(value: Any) -> str:
    """How a value is written on the trainer's command line (the way Vertex AI passes it)."""
    if isinstance(value, float):
        return repr(value)  # repr keeps every digit: 0.1 stays 0.1, 1e-05 stays parseable
    return str(value)


def to_trial_flags(params: Mapping[str, Any]) -> list[str]:
    """`{"l2": 0.1, "batch_size": 32}` -> `["--l2=0.1", "--batch_size=32"]`."""
    return [f"--{name}={format_flag_value(value)}" for name, value in params.items()]


def join_flag_values(flags: Sequence[str]) -> list[str]:
    """`["--num_epochs", "5", "--cache"]` -> `["--num_epochs=5", "--cache"]`: one token per flag,
    as Vertex AI passes tuned values, so each is readable in the spec and the console."""
    out: list[str] = []
    for token in flags:
        if out and not token.startswith("--") and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def check_against_trainer(space: SearchSpace, fixed_flags: Sequence[str] = ()) -> None:
    """Fails unless every parameter is a trainer flag, each of its values parses, and no tuned
    flag is also fixed (the fixed one would silently win or lose, depending on order)."""
    from trainer.config import make_arg_parser

    by_flag = make_arg_parser().options
    problems = []
    for p in space.parameters:
        action = by_flag.get(f"--{p.name}")
        if action is None or action.dest in ("data", "job_dir"):
            problems.append(f"{p.name!r} is not a tunable trainer flag")
            continue
        samples = p.values if p.values else (p.min, p.max)
        if p.type == "integer":
            samples = (int(p.min), int(p.max))
        for value in samples:
            text = format_flag_value(value)
            try:
                parsed = action.type(text) if action.type else text
            except Exception as e:  # ValueError from int/float, ArgumentTypeError from parse_bool
                problems.append(f"{p.name}={text!r} does not parse as the trainer's --{p.name}: {e}")
                continue
            if action.choices is not None and parsed not in action.choices:
                problems.append(f"{p.name}={text!r} is not one of {list(action.choices)}")
            elif p.type == "double" and isinstance(parsed, int) and not isinstance(parsed, bool):
                # Its ends parse, but the values between them ("--batch_size=23.7") would not.
                problems.append(f"{p.name} is a double range [{p.min}, {p.max}] but --{p.name} takes whole "
                                f"numbers; make it `type: integer` or `type: discrete`")
                break
    fixed_names = {f.split("=", 1)[0].lstrip("-") for f in fixed_flags if f.startswith("--")}
    fixed_dests = {by_flag[f"--{n}"].dest for n in fixed_names if f"--{n}" in by_flag}
    overlap = sorted(p.name for p in space.parameters if f"--{p.name}" in by_flag
                     and by_flag[f"--{p.name}"].dest in fixed_dests)
    if overlap:
        problems.append(f"flags {overlap} are both tuned and fixed; drop them from the fixed flags")
    if problems:
        raise SearchSpaceError("search space does not fit the trainer: " + "; ".join(problems))


def main() -> None:
    """`python -m trainer.search_space > search.yaml`: the book's space, to edit."""
    sys.stdout.write(BOOK_SEARCH_SPACE_YAML)


if __name__ == "__main__":
    main()
