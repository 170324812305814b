"""Lean installs: a CPU `pip install matrixopt` needs torch alone (no triton, numpy or scipy),
and the sdist carries what its tests import."""
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(out)], cwd=ROOT, check=True,
                   capture_output=True)
    (path,) = out.glob("matrixopt-*.tar.gz")
    return path


def test_only_torch_is_required(sdist):
    with tarfile.open(sdist) as tar:
        info = next(m for m in tar.getmembers() if m.name.endswith("/PKG-INFO") and m.name.count("/") == 1)
        metadata = tar.extractfile(info).read().decode()
    required = [line.split(":", 1)[1].strip() for line in metadata.splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert [r.split(">")[0].split("=")[0].strip() for r in required] == ["torch"], required
    assert "Provides-Extra: triton" in metadata and "Provides-Extra: fit" in metadata


def test_sdist_ships_what_the_tests_import(sdist):
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for needed in ("benchmarks/__main__.py", "benchmarks/train.py", "tests/test_benchmarks.py",
                   "tests/data/golden.json", "tests/dist_utils.py", "ARCHITECTURE.md", "optim/data/ns_coefficients.json"):
        assert needed in names, needed


def test_every_optimizer_steps_without_triton():
    """With triton not importable, matrixopt imports and every optimizer steps; forcing the
    Triton backend says how to get it."""
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None          # `import triton` raises ImportError
        import warnings
        warnings.simplefilter("ignore")
        import torch, matrixopt
        from matrixopt.kernels import newton_schulz
        for cls in (matrixopt.Muon, matrixopt.ROOT, matrixopt.ARO, matrixopt.GaLoreAdamW, matrixopt.DCTAdamW):
            p = torch.nn.Parameter(torch.randn(16, 24))
            opt = cls([p], lr=0.01)
            for _ in range(2):
                p.grad = torch.randn_like(p)
                opt.step()
        try:
            newton_schulz(torch.randn(4, 4), [(3.4445, -4.775, 2.0315)], backend="triton")
        except RuntimeError as e:
            assert "pip install 'matrixopt[triton]'" in str(e), e
        else:
            raise AssertionError("forcing triton without it did not raise")
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
