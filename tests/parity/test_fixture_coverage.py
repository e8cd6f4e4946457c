"""Every fixture directory present is either tested through its method's parity test or reported as pending."""

from __future__ import annotations

from pathlib import Path

import pytest

import vtoken
from tests.parity.fixtures import fixtures_root

HERE = Path(__file__).parent
# fixture sets whose methods belong to later issues: the directory and the issue that implements it
PENDING = {
    "pitome": "issue 15 (encoder stage in VLM towers): PiToMe",
    "dymu": "issue 15 (encoder stage in VLM towers): DyMU",
}


def fixture_dirs(m) -> tuple[str, ...]:
    """The fixture directories a method's parity tests cover (``fixture`` may name one or a tuple)."""
    return m.fixture if isinstance(m.fixture, tuple) else (m.fixture or m.name,)


def _dirs() -> list[str]:
    root = fixtures_root()
    return sorted(p.parent.name for p in root.glob("*/manifest.json")) if root.is_dir() else []


@pytest.mark.parametrize("fixture_dir", _dirs() or [pytest.param(None, marks=pytest.mark.skip("no fixtures"))])
def test_fixture_dir_is_covered(fixture_dir):
    owners = [m for m in vtoken.methods() if fixture_dir in fixture_dirs(m) and m.parity]
    if owners:
        assert (HERE / f"test_{fixture_dir}.py").is_file(), f"{owners[0].name} claims parity but has no parity test"
        return
    if fixture_dir in PENDING:
        pytest.skip(f"{fixture_dir}: method not implemented yet ({PENDING[fixture_dir]})")
    pytest.fail(f"fixture set {fixture_dir!r} has no registered method with parity=True and is not pending")


def test_parity_flag_matches_tests():
    for m in vtoken.methods():
        for d in fixture_dirs(m) if m.parity else ():
            assert (HERE / f"test_{d}.py").is_file(), f"{m.name}: parity=True but no parity test for {d}"
