"""The README's Python snippets run as written."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def python_blocks():
    text = (REPO / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_a_usage_snippet():
    assert any("DebiasedContrastiveLoss" in block for block in python_blocks())


def test_readme_snippets_run(tmp_path):
    for n, block in enumerate(python_blocks()):
        script = tmp_path / f"snippet_{n}.py"
        script.write_text(block)
        out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"README snippet {n} failed:\n{block}\n{out.stderr}"
