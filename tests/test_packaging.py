"""Each role installs only what it imports: setup.py's extras against the code's own imports.

Read with `ast` (module-level and lazy imports alike), so no new venv is needed: every module a
role's entry points reach through project imports may import only the standard library, the
project, and the distributions of the base requirements plus that role's extra.
"""
from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import re
import sys
from functools import lru_cache

import pytest
from packaging.requirements import Requirement

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = ("etl", "shared", "trainer")

# role -> (its modules, setup.py extras it installs, project modules it must not reach)
ROLES = {
    "etl": (["etl.__main__", "etl.pipeline", "etl.dataflow_options"], ["etl"], ["trainer"]),
    "sample": (["etl.sample"], ["sample"], ["trainer", "apache_beam"]),
    "training": (["trainer.train"], ["training"], ["etl", "trainer.tuning", "trainer.cloud", "trainer.serving.app"]),
    "serving": (["trainer.serve", "trainer.predict", "trainer.bytes_only_export", "trainer.serving.serve"],
                ["serving"], ["etl", "tf_keras", "trainer.train", "trainer.export", "trainer.models", "trainer.ingest"]),
    "tuning": (["trainer.tune", "trainer.search_space"], ["tuning"], ["etl", "trainer.serving", "trainer.cloud"]),
    # TensorFlow is installed for --local_run's trainers, but the command itself must not load it:
    # tests/test_cloud.py checks that at run time (run_folder imports it inside functions cloud never calls).
    "cloud": (["trainer.cloud.__main__", "trainer.cloud.images"], ["cloud"], ["etl", "trainer.train", "trainer.serving"]),
    # `trainer.cloud deploy` runs this in a subprocess (its TensorFlow stays out of the command).
    "cloud-serving-copy": (["trainer.bytes_only_export"], ["cloud"], ["etl", "tf_keras", "trainer.train"]),
    "benchmarks": (["etl.bench", "trainer.bench_ingest", "trainer.serving.bench", "trainer.bench_vectorise",
                    "trainer.bench_strategies"], ["etl", "training", "serving", "bench"], []),
}


def _setup_py():
    """setup.py's BASE and EXTRAS, without running setuptools.setup."""
    source = open(os.path.join(REPO, "setup.py")).read().replace("setuptools.setup(", "dict(")
    scope: dict = {}
    exec(compile(source, "setup.py", "exec"), scope)  # noqa: S102 - the project's own file
    return scope["BASE"], scope["EXTRAS"]


def _dist(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", Requirement(requirement).name).lower()


def allowed_distributions(extras: list[str]) -> set[str]:
    base, all_extras = _setup_py()
    return {_dist(r) for r in base} | {_dist(r) for extra in extras for r in all_extras[extra]}


def module_path(name: str) -> str | None:
    """The file of a project module or package, or None if `name` is not one."""
    relative = os.path.join(REPO, *name.split("."))
    for path in (relative + ".py", os.path.join(relative, "__init__.py")):
        if os.path.isfile(path):
            return path
    return None


@lru_cache(maxsize=None)
def imports_of(name: str) -> tuple[str, ...]:
    """Every module `name` imports, at module level or inside functions, as dotted names."""
    path = module_path(name)
    tree = ast.parse(open(path).read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.append(base)
            # `from trainer import config`: config is a module; `from x import name`: only x counts.
            found.extend(f"{base}.{alias.name}" for alias in node.names if module_path(f"{base}.{alias.name}"))
    return tuple(n for n in found if n and n != "__future__")


def reachable(roots: list[str]) -> dict[str, set[str]]:
    """Project module -> the non-project modules it imports, over everything `roots` reach."""
    seen: dict[str, set[str]] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        assert module_path(name), f"{name} is not a project module"
        seen[name] = set()
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) not in seen)
        for imported in imports_of(name):
            if imported.split(".")[0] in PROJECT:
                todo.append(imported if module_path(imported) else imported.rpartition(".")[0])
            else:
                seen[name].add(imported)
    return seen


@lru_cache(maxsize=None)
def distributions_providing(module: str) -> frozenset[str]:
    """The installed distributions a third-party import comes from. A namespace package (google)
    is spread over several, so its deepest importable part is located by file."""
    top = module.split(".")[0]
    candidates = importlib.metadata.packages_distributions().get(top, [])
    if len(candidates) <= 1:
        return frozenset(re.sub(r"[-_.]+", "-", d).lower() for d in candidates)
    parts = module.split(".")
    for depth in range(len(parts), 1, -1):
        spec = importlib.util.find_spec(".".join(parts[:depth]))
        if spec is not None and spec.origin:
            for dist in candidates:
                files = importlib.metadata.distribution(dist).files or []
                if any(spec.origin.endswith(str(f)) for f in files):
                    return frozenset({re.sub(r"[-_.]+", "-", dist).lower()})
    return frozenset(re.sub(r"[-_.]+", "-", d).lower() for d in candidates)


@pytest.mark.parametrize("role", sorted(ROLES))
def test_each_role_imports_only_what_its_extra_installs(role):
    roots, extras, forbidden = ROLES[role]
    allowed = allowed_distributions(extras)
    modules = reachable(roots)
    problems = []
    for name, third_party in sorted(modules.items()):
        for prefix in forbidden:
            if name == prefix or name.startswith(prefix + "."):
                problems.append(f"{name} is reached, but the {role} role must not need {prefix}")
        for imported in sorted(third_party):
            top = imported.split(".")[0]
            if top in sys.stdlib_module_names:
                continue
            if top in forbidden or imported in forbidden:
                problems.append(f"{name} imports {imported}, which the {role} role must not need")
                continue
            provided = distributions_providing(imported)
            if not provided & allowed:
                problems.append(f"{name} imports {imported} (from {sorted(provided) or 'no installed distribution'}), "
                                f"which neither the base requirements nor the extras {extras} install")
    assert not problems, "\n".join(problems)


def test_the_check_sees_lazy_imports_and_would_catch_a_missing_requirement():
    """The serving role reaches matplotlib only through a lazy import in predict's grid; dropping
    it from the serving extra must be caught."""
    third_party = set().union(*reachable(["trainer.predict"]).values())
    assert "matplotlib" in third_party, "lazy (in-function) imports are not being read"
    assert "matplotlib" in allowed_distributions(["serving"])
    assert "matplotlib" not in allowed_distributions([])


def test_dev_installs_every_role_and_the_test_tools():
    base, extras = _setup_py()
    dev = {_dist(r) for r in extras["dev"]}
    for name, reqs in extras.items():
        assert {_dist(r) for r in reqs} <= dev, f"dev lacks part of the {name} extra"
    assert {"pytest", "httpx"} <= dev
