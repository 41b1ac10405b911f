"""Every benchmark script imports (their shared helpers moved once and two scripts broke unnoticed: the benchmarks
run outside the suite) and `--help` works, in-process."""

import importlib
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_script_imports_and_prints_help(name, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module(name)
    if not hasattr(module, "main"):
        return  # a helper module of the scripts
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_the_scripts_are_found():
    assert {"longpo_vs_dpo", "sp_memory", "sp_comm", "rss"} <= set(SCRIPTS)
