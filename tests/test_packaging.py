"""What a non-editable install gets: the wheel holds grpo and grpo_kernels with the native epilogue's C++ source,
and no top-level `bench` (the benchmark suite runs from a checkout)."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from grpo_kernels import native

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "grpo_kernels"


def test_native_source_lives_inside_the_package():
    # An installed wheel has only the package folder: the source must be found relative to it.
    assert native._SOURCE.is_file()
    assert PACKAGE.resolve() in native._SOURCE.resolve().parents


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> list[str]:
    """File names inside a wheel built from a copy of this checkout (a copy, so no stale build/ folder leaks in)."""
    pytest.importorskip("setuptools", reason="building the wheel without network needs setuptools installed")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "results", "*.egg-info", "build")
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("grpo", "grpo_kernels", "bench"):  # bench is copied so that leaving it out is the config's doing
        shutil.copytree(REPO / name, src / name, ignore=skip)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir",
                           "-q", str(src), "-w", str(tmp / "dist")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (whl,) = (tmp / "dist").glob("grpo_kernels-*.whl")
    with zipfile.ZipFile(whl) as z:
        return z.namelist()


def test_wheel_ships_the_native_sources(wheel_names):
    sources = sorted(p.relative_to(REPO).as_posix() for p in (PACKAGE / "csrc").glob("*.cpp"))
    assert sources, "no C++ sources under grpo_kernels/csrc"
    missing = [s for s in sources if s not in wheel_names]
    assert not missing, f"the wheel lacks {missing}"


def test_wheel_installs_only_our_packages(wheel_names):
    tops = {n.split("/", 1)[0] for n in wheel_names}
    extra = {t for t in tops if t not in ("grpo", "grpo_kernels") and not t.endswith(".dist-info")}
    assert not extra, f"the wheel would install top-level {sorted(extra)}"
    assert "grpo/trainer.py" in wheel_names and "grpo_kernels/api.py" in wheel_names
