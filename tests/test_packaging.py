"""pyproject.toml pins: the tested environment satisfies them, caps carry their reason, runtime needs are declared."""

import importlib.metadata as md
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
TESTED_EXTRAS = ("hf", "test", "data", "plot")  # what `make test` installs


def requirements(extras=TESTED_EXTRAS):
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + sum((project["optional-dependencies"][e]
                                                                   for e in extras), [])]


def test_this_environment_satisfies_every_pin():
    """A floor above the versions the suite runs on would claim support nobody tested (and break `make`)."""
    for req in requirements():
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            pytest.fail(f"{req.name} is a dependency but not installed")
        assert req.specifier.contains(version, prereleases=True), f"{req} excludes the tested {req.name} {version}"


def test_caps_only_with_a_reason_and_floors_everywhere():
    """An upper bound forces downgrades in users' environments: only for a known break, with the reason beside it."""
    found = []
    for line in PYPROJECT.read_text().splitlines():
        code, _, reason = line.partition("#")
        for text in re.findall(r'"([A-Za-z][\w.\-\[\]]*\s*[<>=!~][^"]*)"', code):
            req = Requirement(text)
            found.append(req)
            ops = {spec.operator for spec in req.specifier}
            assert ">=" in ops, f"no floor: {text}"
            if ops & {"<", "<=", "==", "~=", "==="}:
                assert reason.strip(), f"a cap without its reason beside it: {text}"
    build = tomllib.loads(PYPROJECT.read_text())["build-system"]["requires"]
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    assert len(found) == len(requirements(tuple(extras))) + len(build)


def test_runtime_imports_are_declared():
    """jinja2 renders every chat template (transformers only lazily needs it, and refuses < 3.1.6)."""
    names = {r.name.lower() for r in requirements(())}
    assert {"jinja2", "transformers", "jax", "flax", "grain", "orbax-checkpoint", "tqdm"} <= names
    (jinja,) = [r for r in requirements(()) if r.name.lower() == "jinja2"]
    assert not jinja.specifier.contains("3.1.5") and jinja.specifier.contains("3.1.6")
