"""`--help` of every CLI command and of the example training script prints and exits 0 (argparse %-formats help
texts: a bare `%` in a config field's help crashed it)."""

from __future__ import annotations

import runpy
import sys

import pytest
from conftest import ROOT

from trl_longpo.cli import COMMANDS, main


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_cli_command_prints_its_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"trl-longpo {command}" in capsys.readouterr().out


def test_example_training_script_prints_its_help(monkeypatch, capsys):
    """The script run as `__main__` (runpy: what `python examples/train_mistral.py --help` executes), in this process:
    a fresh interpreter would only add ~8 CPU-s of imports."""
    script = ROOT / "examples" / "train_mistral.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--ring_attn_impl" in out and "ideal scaling" in out
