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


def test_config_docstring_documents_every_added_field_with_its_default():
    """Like TRL's DPOConfig: every field LongPOConfig adds is in its docstring, under a group, with its real default."""
    import re

    doc = LongPOConfig.__doc__
    dpo = {f.name for f in dataclasses.fields(DPOConfig)}
    added = [f for f in dataclasses.fields(LongPOConfig) if f.name not in dpo]
    assert len(added) >= 16
    groups = [m.start() for m in re.finditer(r"^ {8}> Parameters that control ", doc, re.M)]
    for f in added:
        match = re.search(rf"^ {{8}}{f.name} \(`[^`]+`, \*optional\*(?:, defaults to `(.+?)`)?\):$", doc, re.M)
        assert match, f"LongPOConfig's docstring does not document `{f.name}`"
        assert groups and match.start() > groups[0], f"`{f.name}` is documented outside a parameter group"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        expected = None if default is None else f'"{default}"' if isinstance(default, str) else str(default)
        assert match.group(1) == expected, f"`{f.name}`: docstring default {match.group(1)!r}, field {expected!r}"
