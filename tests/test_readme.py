"""The README's Python snippets run as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def python_blocks():
    text = (REPO / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_a_usage_snippet():
    assert any("DebiasedContrastiveLoss" in block for block in python_blocks())


@pytest.mark.parametrize("n", range(len(python_blocks())))
def test_readme_snippets_run(tmp_path, n):
    block = python_blocks()[n]
    env = dict(os.environ)
    if "load_dataset" in block:
        if not (SHARED_DATA / "ml-1m-sasrec").exists():
            pytest.skip("the ML-1M copy of ../shared/data is absent (the snippet would download it)")
        env["HDCCF_DATA_DIR"] = str(SHARED_DATA)
    script = tmp_path / f"snippet_{n}.py"
    script.write_text(block)
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, f"README snippet {n} failed:\n{block}\n{out.stderr}"
