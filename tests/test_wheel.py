"""Install as the README says: a wheel built from a clean checkout carries the C sources and the shipped
tensors, and installed into a fresh venv it builds its kernels and answers ``swiftkv generate``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _checkout_files() -> list[str]:
    """The files a clean checkout of this tree has (tracked and not ignored), or skip outside a git checkout."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the wheel is built from one")
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("build", reason="pip install build (in the test extra)")
    src, dist = tmp_path_factory.mktemp("checkout"), tmp_path_factory.mktemp("dist")
    for f in _checkout_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    # --no-isolation: the build backend (setuptools) from this environment, nothing downloaded
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(src)],
                   check=True, capture_output=True, text=True)
    (whl,) = dist.glob("swiftkv-*.whl")
    return whl


def _venv_seeing_this_environment(env_dir: Path) -> Path:
    """A new venv whose interpreter also sees *this* environment's packages (torch, transformers), whether the
    tests run from a venv or a system Python. ``system_site_packages`` would show the base interpreter's
    packages, not a venv's: the current ``sys.path`` entries are appended instead (a ``.pth`` of plain paths,
    so the new venv's own site-packages, where the wheel goes, still comes first, and this environment's
    editable install of swiftkv -- a finder hooked in by a ``.pth`` that is not run from there -- stays out)."""
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in sys.path if p and Path(p).is_dir() and Path(p).resolve() != ROOT]
    (Path(purelib) / "_swiftkv_test_parent_env.pth").write_text("\n".join(ours) + "\n")
    return py


def test_the_wheel_carries_the_c_sources_and_the_shipped_tensors(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for d, pattern in (("swiftkv/kernels/csrc", "*.[ch]"), ("swiftkv/models/shipped", "*.safetensors"),
                       ("swiftkv/data/truthful_qa", "*")):
        expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / d).glob(pattern)}
        assert expected and expected <= names, f"missing from the wheel: {sorted(expected - names)[:3]}"
    assert not [n for n in names if n.startswith("tests/")]
    assert "swiftkv-0.1.0.dist-info/entry_points.txt" in names  # the CLI and the vLLM plugin entry point


def test_the_installed_wheel_builds_its_kernels_and_generates(wheel, tiny_chat_model_dir, tmp_path):
    """A fresh venv (this environment's packages visible, for torch and transformers: nothing downloaded) with
    the wheel installed: its own copy of swiftkv answers, compiling its kernels into an empty cache."""
    from swiftkv.kernels import linear

    env_dir = tmp_path / "venv"
    py = _venv_seeing_this_environment(env_dir)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, text=True)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONPATH": ""}
    where = subprocess.run([str(py), "-c", "import swiftkv; print(swiftkv.__file__)"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(env_dir), f"the venv imported {where}, not the installed wheel"
    run = subprocess.run([str(env_dir / "bin" / "swiftkv"), "generate", str(tiny_chat_model_dir), "--prompt", "Hi",
                          "--max-tokens", "4", "--dtype", "float32"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "[4 tokens in" in run.stderr or "finish=stop" in run.stderr
    if linear.library() is not None:  # this CPU runs the kernels: the installed copy built its own library
        assert list((tmp_path / "cache" / "swiftkv" / "kernels").glob("libswiftkv-*.so"))
