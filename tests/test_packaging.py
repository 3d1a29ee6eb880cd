"""The package installs as a wheel into a fresh environment and imports from outside the repo."""

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv(tmp_path):
    env_dir = tmp_path / "venv"
    # The environment running the tests provides torch, numpy and pip (whose setuptools builds
    # the wheel), whether it is the system's or a virtual environment (whose packages a venv's
    # system_site_packages would not see): a .pth file adds its site directories. The package
    # itself is installed fresh into the venv, which comes first on its own path.
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    inner_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                check=True, capture_output=True, text=True).stdout.strip()
    outer = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    Path(inner_site, "outer_environment.pth").write_text("\n".join(sorted(outer)) + "\n")
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", str(REPO)],
        check=True, cwd=tmp_path, env={**os.environ, "PIP_NO_INPUT": "1"},
    )
    probe = (
        "import importlib.util, json, pathlib, sys\n"
        "import hdccf_triton, hdccf_triton.kernels, hdccf_triton.backends.triton_dot, hdccf_triton.data.split\n"
        "site = [p for p in sys.path if p.endswith('site-packages') and p.startswith(sys.prefix)][0]\n"
        "print(json.dumps({'pkg': hdccf_triton.__file__, 'kernels': hdccf_triton.kernels.__file__,\n"
        "  'backends': hdccf_triton.backends.triton_dot.__file__, 'data': hdccf_triton.data.split.__file__,\n"
        "  'loss_md': (pathlib.Path(hdccf_triton.__file__).parent / 'LOSS.md').exists(),\n"
        "  'top_level_kernels': (pathlib.Path(site) / 'kernels').exists(),\n"
        "  'triton_imported': 'triton' in sys.modules, 'polars_imported': 'polars' in sys.modules}))\n"
    )
    out = subprocess.run([python, "-c", probe], check=True, cwd=tmp_path, capture_output=True, text=True)
    import json

    info = json.loads(out.stdout)
    assert all(str(env_dir) in info[k] for k in ("pkg", "kernels", "backends", "data")), info
    assert info["loss_md"]
    assert not info["top_level_kernels"]
    assert not info["triton_imported"] and not info["polars_imported"]


def test_import_needs_only_torch_and_numpy():
    code = (  # torch itself may import tqdm: count only what hdccf_triton adds
        "import sys, torch, numpy\n"
        "before = set(sys.modules)\n"
        "import hdccf_triton\n"
        "heavy = [m for m in ('triton', 'polars', 'tqdm', 'matplotlib') if m in set(sys.modules) - before]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_the_cpu_path_never_imports_triton():
    # backend="auto" on CPU tensors is the reference: choosing it must not import Triton (about
    # a second and its memory, at the first loss call of every CPU run)
    code = (
        "import sys, torch\n"
        "from hdccf_triton import debiased_contrastive_loss\n"
        "M, P, d = 4, 2, 3\n"
        "ids = [torch.arange(M), torch.arange(M), torch.zeros(M, P, dtype=torch.long), torch.zeros(M, P, dtype=torch.long)]\n"
        "emb = [torch.randn(M, d), torch.randn(M, d), torch.randn(M, P, d), torch.randn(M, P, d)]\n"
        "loss = debiased_contrastive_loss(*emb, *ids)\n"
        "assert torch.isfinite(loss)\n"
        "assert 'triton' not in sys.modules, 'backend=auto on CPU imported triton'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "TRITON_INTERPRET": "0"})
