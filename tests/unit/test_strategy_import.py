import subprocess
import sys


def test_importing_strategy_does_not_import_torch():
    code = "import sys, strategy, strategy.rerank, strategy.schema; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
