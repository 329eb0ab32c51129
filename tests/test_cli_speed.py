"""The command line's help and dataset listing start without torch (issue: `kcircuits --help` took 7 s).

Timings are measured in benchmarks/cli_startup.py, not asserted here; what is asserted is the cause:
torch and transformers are not imported by the commands that do not run a model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kcircuits.discover import registry

PROBE = """
import json, sys
from kcircuits.cli import main
try:
    code = main({argv})
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("torch", "transformers", "safetensors.torch") if m in sys.modules)
print(json.dumps({{"code": code, "heavy": heavy}}))
"""


@pytest.mark.parametrize("argv", [["--help"], ["discover", "--help"], ["select", "--help"], ["datasets"],
                                  ["datasets", "country_capital"]])
def test_commands_that_run_no_model_import_no_torch(argv):
    out = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "heavy": []}


def test_method_names_read_from_source_match_the_registry():
    """The CLI offers the methods it reads from the modules' source; importing them registers the same ones."""
    declared = registry.declared_method_names()
    assert declared == tuple(registry.load_all())
    assert len(declared) == len(set(declared)) >= 3


def test_edit_method_names_read_from_source_match_the_registry():
    from kcircuits.edit import registry as edit_registry

    declared = edit_registry.REGISTRY.declared_names()
    assert set(declared) == set(edit_registry.REGISTRY.load_all()) >= {"rome", "memit"}
    assert len(declared) == len(set(declared))
