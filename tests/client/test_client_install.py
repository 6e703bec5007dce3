"""The client as the README and docs/client.md install it: only ``requirements-client.txt``, nothing else.

``test_requirements_client_alone_run_every_documented_command`` makes a new virtualenv, installs only that
file with pip (from the registry or pip's cache; about 20-30 s, mostly waiting on the index) and runs
``python -m client --help``, every subcommand's ``--help`` and the dataset factory's documented first
command (``--mock``) from a folder laid out like the repository root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ("run", "batch", "serve", "dataset")
FIRST_DATASET_COMMAND = ["dataset", "--config", "client/dataset/example.yaml", "--mock"]


def repository_like(tmp: Path) -> Path:
    """A folder where ``client`` and ``workflows`` are the repository's (symlinks): the documented commands
    run there word for word and write ``outputs/`` inside it, not into the repository."""
    work = tmp / "checkout"
    work.mkdir()
    for name in ("client", "workflows", "requirements-client.txt"):
        (work / name).symlink_to(ROOT / name)
    return work


def test_help_imports_nothing_heavy():
    """``python -m client --help`` (the parser) needs neither numpy, Pillow, aiohttp nor tqdm."""
    code = ("import sys; from client.__main__ import build_parser; build_parser(); "
            "print(sorted(m for m in ('numpy', 'PIL', 'aiohttp', 'tqdm', 'yaml') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.replace("'", '"')) == []


def test_requirements_client_alone_run_every_documented_command(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)  # pip below runs from this interpreter, into the new one
    python = env_dir / "bin" / "python"
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                              "--no-compile", "--disable-pip-version-check", "-r", str(ROOT / "requirements-client.txt")],
                             capture_output=True, text=True, timeout=600)
    if install.returncode != 0 and "Could not find a version" in install.stderr + install.stdout:
        pytest.skip(f"the package registry is not reachable from here: {install.stderr[-500:]}")
    assert install.returncode == 0, install.stderr[-2000:]
    work = repository_like(tmp_path)
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}

    def client(*args):
        return subprocess.run([str(python), "-m", "client", *args], cwd=work, capture_output=True, text=True,
                              timeout=300, env=clean_env)

    done = client("--help")
    assert done.returncode == 0, done.stderr
    assert all(command in done.stdout for command in COMMANDS)
    for command in COMMANDS:
        done = client(command, "--help")
        assert done.returncode == 0, f"python -m client {command} --help: {done.stderr}"
        assert f"usage: python -m client {command}" in done.stdout
    done = client(*FIRST_DATASET_COMMAND)
    assert done.returncode == 0, done.stderr
    assert "exported pairs: train" in done.stdout
    assert (work / "outputs" / "dataset" / "hf" / "train" / "metadata.jsonl").is_file()
    assert (work / "outputs" / "reports" / "qa" / "report.html").is_file()
