"""The servicer depends on the engine interface (engine_adapter.types.EngineClient), never on vLLM."""

import subprocess
import sys

from tests.fixtures import ROOT


def test_servicer_imports_no_vllm():
    code = "import sys, servicer.cli, servicer.server, servicer.handlers; print(sorted(m for m in sys.modules if m.split('.')[0] == 'vllm'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
