"""The hashed locks (docs/operations.md "Reproducible dependencies") say what pyproject.toml asks for, every pin
carries hashes, and the environment the tests run in was installed from them."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pins(lock: Path) -> dict[str, tuple[str, Marker | None, int]]:
    """name -> (version, marker, number of hashes), from a pip requirements file with --hash options."""
    pins = {}
    text = lock.read_text().replace("\\\n", " ")
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        spec, *hashes = re.split(r"\s+--hash=", line)
        req = Requirement(spec)
        (pinned,) = list(req.specifier)
        assert pinned.operator == "==", f"{lock.name}: {spec} is not pinned"
        assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), f"{lock.name}: {spec}"
        pins[canonicalize_name(req.name)] = (pinned.version, req.marker, len(hashes))
    return pins


RUNTIME = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
DEV = [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["dev"]]
BUILD = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]


@pytest.mark.parametrize(
    ("lock", "wanted"),
    [("requirements.txt", RUNTIME + BUILD), ("requirements-dev.txt", RUNTIME + DEV + BUILD)],
)
def test_each_lock_pins_with_hashes_what_pyproject_asks_for(lock: str, wanted: list[Requirement]) -> None:
    pins = _pins(ROOT / lock)
    assert all(n >= 1 for _, _, n in pins.values())
    for req in wanted:
        name = canonicalize_name(req.name)
        assert name in pins, f"{lock} lacks {req}: run `make lock`"
        assert req.specifier.contains(pins[name][0], prereleases=True), (
            f"{lock} pins {name}=={pins[name][0]}, outside {req} in pyproject.toml: run `make lock`"
        )
    if lock == "requirements.txt":
        assert not {canonicalize_name(r.name) for r in DEV} & set(pins), "dev tools in the runtime lock"


def test_this_environment_was_installed_from_the_lock() -> None:
    """What `make deps` installed is what requirements-dev.txt pins (for this platform's markers)."""
    for name, (version, marker, _) in _pins(ROOT / "requirements-dev.txt").items():
        if marker is not None and not marker.evaluate():
            continue
        assert metadata.version(name) == version, (
            f"{name} {metadata.version(name)} installed, {version} locked"
        )
