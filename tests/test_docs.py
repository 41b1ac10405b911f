"""The README documents every LongPOConfig field and CI runs exactly the README's test command."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from trl import DPOConfig

from trl_longpo import LongPOConfig

ROOT = Path(__file__).resolve().parents[1]


def test_readme_documents_every_longpo_field():
    readme = (ROOT / "README.md").read_text()
    dpo_defaults = {f.name: f.default for f in dataclasses.fields(DPOConfig)}
    changed = [
        f.name
        for f in dataclasses.fields(LongPOConfig)
        if f.name not in dpo_defaults or dpo_defaults[f.name] != f.default
    ]
    assert "dpo_weight" in changed and "max_length" in changed
    missing = [name for name in changed if f"`{name}`" not in readme]
    assert not missing, f"README lacks LongPOConfig fields: {missing}"
    for field in dataclasses.fields(LongPOConfig):
        if field.name in changed:
            assert field.metadata.get("help"), f"{field.name} has no help text"


def test_ci_runs_the_readme_test_command():
    """README command 2 (install && test) runs in .ci/run, in a fresh virtual environment."""
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if "python -m pytest" in line and line.startswith("pip"))
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if not line.lstrip().startswith("#")]
    install, test = command.split(" && ")
    assert install in ci and any(line.startswith(test) for line in ci)
    assert any(line.startswith('"$PYTHON" -m venv') for line in ci) and 'rm -rf "$VENV"' in ci
