"""benchmarks/gpu_session.sh, the script a GPU machine runs, checked without a GPU: bash accepts
it, what it calls exists, and it brings back its two files whatever fails."""
import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

from benchmarks import __main__ as cli

pytestmark = pytest.mark.usefixtures("no_network", "keep_threads")


def test_gpu_session_script_parses_and_runs_modules_that_exist():
    """benchmarks/gpu_session.sh is only run on a GPU machine: check here that bash accepts
    it and that every `python3 -m benchmarks.X` / `benchmarks CMD` it calls exists."""
    script = Path(cli.__file__).with_name("gpu_session.sh")
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    modules = re.findall(r"python3 -m benchmarks\.(\w+)", text)
    commands = re.findall(r"python3 -m benchmarks (\w+)", text)
    assert modules and commands
    for name in modules:
        assert Path(cli.__file__).with_name(f"{name}.py").exists(), name
    for command in commands:  # argparse exits 0 on --help of a command it knows, 2 otherwise
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--help"])
        assert exit_.value.code == 0, command


def test_gpu_session_script_brings_back_two_files_whatever_fails(tmp_path):
    """With a stand-in python3 whose benchmarks write their files (one fails), OUT holds only
    the bundle and the log (the device tool returns at most 8 files), the bundle has every
    finished benchmark's files, and the log what they all printed."""
    root = Path(cli.__file__).resolve().parents[1]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text("""#!/usr/bin/env bash
# pip and import checks succeed; `-m benchmarks[.]X ... --out DIR` writes X.md/X.json there
[ "$1" = "-m" ] || exit 0
case "$2" in pip) exit 0 ;; esac
name=${2#benchmarks.}; [ "$name" = benchmarks ] && name=$3
out=${@: -1}
echo "row of $name"
[ "$name" = lowrank ] && exit 3
echo "# $name" > "$out/$name.md"; echo "{}" > "$out/$name.json"
""")
    fake.chmod(0o755)
    dest = tmp_path / "OUT"
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}
    subprocess.run(["bash", str(root / "benchmarks" / "gpu_session.sh"), str(dest)], cwd=root, env=env,
                   check=True, capture_output=True, timeout=60)
    assert sorted(p.name for p in dest.iterdir()) == ["gpu-results.tar.gz", "gpu-session.log"]
    with tarfile.open(dest / "gpu-results.tar.gz") as tar:
        names = set(tar.getnames())
    finished = ("memory", "int8/step", "step", "ns", "projection", "dct", "distributed")
    assert names == {f"{n}.{ext}" for n in finished for ext in ("md", "json")}
    log = (dest / "gpu-session.log").read_text()
    assert "row of lowrank" in log and "!! exit 3 from: python3 -m benchmarks.lowrank" in log
