"""`--help` of every CLI command and of the example training script prints and exits 0 (argparse %-formats help
texts: a bare `%` in a config field's help crashed it)."""

from __future__ import annotations

import subprocess
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


def test_example_training_script_prints_its_help():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_mistral.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--ring_attn_impl" in result.stdout and "ideal scaling" in result.stdout
