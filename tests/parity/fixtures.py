"""Loading golden parity fixtures (``$VTOKEN_PARITY_FIXTURES``, default ``../shared/fixtures/parity``).

Each method directory has a ``manifest.json`` listing its case files; tests parametrise over whatever cases the
manifest lists, so further fixture sets of the same format run unchanged.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]


def fixtures_root() -> Path:
    env = os.environ.get("VTOKEN_PARITY_FIXTURES")
    return Path(env) if env else (REPO / ".." / "shared" / "fixtures" / "parity").resolve()


@dataclass(frozen=True)
class Case:
    method_dir: str
    file: str
    path: Path
    manifest: dict

    def __str__(self) -> str:
        return f"{self.method_dir}/{self.file}"

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
        """(inputs cast to float32 where floating, expected outputs, decoded parameters)."""
        tensors = load_file(str(self.path))
        with safe_open(str(self.path), framework="pt") as f:
            meta = f.metadata() or {}
        params = {k: json.loads(v) for k, v in meta.items() if not (k.startswith("__") and k.endswith("__"))}
        ins = {k[3:]: (v.float() if v.is_floating_point() else v) for k, v in tensors.items() if k.startswith("in_")}
        outs = {k[4:]: v for k, v in tensors.items() if k.startswith("out_")}
        return ins, outs, params


def cases(method_dir: str) -> list[Any]:
    """pytest params, one per case listed in ``<root>/<method_dir>/manifest.json`` (one skip if absent)."""
    root = fixtures_root()
    manifest_path = root / method_dir / "manifest.json"
    if not manifest_path.is_file():
        reason = f"no parity fixtures for {method_dir!r} under {root} (set VTOKEN_PARITY_FIXTURES)"
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason), id=f"{method_dir}-absent")]
    manifest = json.loads(manifest_path.read_text())
    return [pytest.param(Case(method_dir, c["file"], root / method_dir / c["file"], manifest), id=c["file"])
            for c in manifest["cases"]]


def assert_exact(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    got = torch.as_tensor(got).cpu()
    assert tuple(got.shape) == tuple(expected.shape), f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    assert torch.equal(got.to(expected.dtype), expected), f"{what}: values differ\n got {got}\n expected {expected}"


def assert_close(got: torch.Tensor, expected: torch.Tensor, what: str, atol: float, rtol: float) -> None:
    got = torch.as_tensor(got).cpu()
    assert tuple(got.shape) == tuple(expected.shape), f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(got.to(expected.dtype), expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def check_keys(case: Case, params: dict[str, Any], required: set[str], optional: set[str] = frozenset(),
               outputs: dict[str, Any] | None = None, compared: set[str] | None = None,
               inputs: dict[str, Any] | None = None, mapped: set[str] | None = None) -> None:
    """Fail (naming the case) on a parameter the adapter does not map or a required one missing, on an expected
    output it does not compare (``outputs`` vs ``compared``) and on inputs other than ``mapped``: held-back cases of
    the same format must not pass by being silently half-read."""
    unknown = sorted(set(params) - required - optional)
    if unknown:
        pytest.fail(f"{case}: case parameters {unknown} are not mapped by this adapter")
    missing = sorted(required - set(params))
    if missing:
        pytest.fail(f"{case}: case parameters {missing} missing")
    if outputs is not None and compared is not None:
        stray = sorted(set(outputs) - compared)
        if stray:
            pytest.fail(f"{case}: expected outputs {stray} are not compared by this adapter")
    if inputs is not None and mapped is not None and set(inputs) != mapped:
        pytest.fail(f"{case}: inputs {sorted(inputs)} are not mapped by this adapter (expected {sorted(mapped)})")
