"""What an installed package needs: the sbatch templates and example configs ship in the wheel, and
``dist-unlearn init`` / ``dist-unlearn submit`` work from a wheel install, outside the source tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from conftest import REPO

from dist_unlearn.cli import main

PACKAGE_DATA = [  # (path inside the wheel, the same file in a checkout)
    ("dist_unlearn/launch/slurm/ray_cluster.sbatch", "slurm/ray_cluster.sbatch"),
    ("dist_unlearn/launch/slurm/torchrun.sbatch", "slurm/torchrun.sbatch"),
    ("dist_unlearn/launch/configs/quickstart/unlearn.yaml", "configs/quickstart/unlearn.yaml"),
    ("dist_unlearn/launch/configs/quickstart/contrastive.yaml", "configs/quickstart/contrastive.yaml"),
    ("dist_unlearn/launch/configs/bench/unlearning.yaml", "configs/bench/unlearning.yaml"),
]
CONFIGS = ["bench/unlearning.yaml", "quickstart/contrastive.yaml", "quickstart/unlearn.yaml"]


def test_init_writes_the_shipped_configs_and_never_overwrites(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["init"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("wrote ")] == [f"wrote configs/{c}" for c in CONFIGS]
    assert "next: dist-unlearn run configs/quickstart/unlearn.yaml" in out.splitlines()
    for name in CONFIGS:
        assert (tmp_path / "configs" / name).read_bytes() == (REPO / "configs" / name).read_bytes()
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        f"configs/{c}" for c in CONFIGS
    ]  # no temp files left behind

    (tmp_path / "configs" / "quickstart" / "unlearn.yaml").write_text("mine\n")
    assert main(["init"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dist-unlearn init: not overwriting configs/bench/unlearning.yaml, ") and "--force" in err
    assert (tmp_path / "configs" / "quickstart" / "unlearn.yaml").read_text() == "mine\n"
    assert main(["init", "--force"]) == 0
    assert (tmp_path / "configs" / "quickstart" / "unlearn.yaml").read_bytes() == (
        REPO / "configs" / "quickstart" / "unlearn.yaml"
    ).read_bytes()

    assert main(["init", "elsewhere/examples"]) == 0
    assert "wrote elsewhere/examples/quickstart/contrastive.yaml" in capsys.readouterr().out.splitlines()
    assert (tmp_path / "elsewhere" / "examples" / "bench" / "unlearning.yaml").is_file()


def _build_options() -> list[str]:
    """Offline, with this environment's setuptools, when it is new enough for pyproject.toml (>= 77);
    otherwise an isolated build, which fetches setuptools from the package index."""
    try:
        major = int(version("setuptools").split(".")[0])
    except PackageNotFoundError:
        major = 0
    return ["--no-build-isolation", "--no-index"] if major >= 77 else []


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_wheel_install_ships_templates_and_configs_and_runs_init_and_submit(tmp_path):
    """Build the wheel, install it non-editable into a directory of its own and use it from outside the tree."""
    src = tmp_path / "src"  # build from a copy: nothing is written into the shared checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "MANIFEST.in", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "dist_unlearn", src / "dist_unlearn", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")}
    built = _run([*pip, "wheel", "--no-deps", *_build_options(), "-w", "wheels", str(src)], tmp_path, env)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("dist_unlearn-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        for inside, checkout in PACKAGE_DATA:  # real files with the checkout's bytes, not links
            assert archive.read(inside) == (REPO / checkout).read_bytes(), inside
        assert "dist_unlearn/py.typed" in archive.namelist()  # PEP 561: type checkers read the package's hints

    site = tmp_path / "site"
    installed = _run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], tmp_path, env)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    user = tmp_path / "user"  # a user's working directory: no source tree, no configs
    user.mkdir()
    env["PYTHONPATH"] = str(site)
    probe = "import dist_unlearn, dist_unlearn.launch.submit as s; print(dist_unlearn.__file__); print(s.TEMPLATE_DIR)"
    where = _run([sys.executable, "-c", probe], user, env)
    assert where.returncode == 0, where.stderr[-3000:]
    # the wheel's copy is what gets imported, not the editable install's source tree
    assert where.stdout.splitlines() == [
        str(site / "dist_unlearn" / "__init__.py"),
        str(site / "dist_unlearn/launch/slurm"),
    ]

    cli = str(site / "bin" / "dist-unlearn")  # the wheel's console script
    init = _run([cli, "init"], user, env)
    assert init.returncode == 0, init.stderr[-3000:]
    assert [line for line in init.stdout.splitlines() if line.startswith("wrote ")] == [
        f"wrote configs/{c}" for c in CONFIGS
    ]
    assert (
        f"sbatch templates of submit (copy one and pass --template to change it): {site}/dist_unlearn/launch/slurm"
        in (init.stdout.splitlines())
    )
    for name in CONFIGS:
        assert (user / "configs" / name).read_bytes() == (REPO / "configs" / name).read_bytes()

    config = user / "configs" / "quickstart" / "unlearn.yaml"
    for launcher, template in (("ray", "ray_cluster.sbatch"), ("torchrun", "torchrun.sbatch")):
        installed_template = site / "dist_unlearn" / "launch" / "slurm" / template
        marker = f"# the installed {template}"  # so the script below shows which copy submit read
        installed_template.write_text(installed_template.read_text() + marker + "\n")
        submit = _run(
            [cli, "submit", "configs/quickstart/unlearn.yaml", "--launcher", launcher, "--dry-run"], user, env
        )
        assert submit.returncode == 0, submit.stderr[-3000:]
        script = submit.stdout.splitlines()
        first = (REPO / "slurm" / template).read_text().splitlines()[1]
        assert script[:2] == ["#!/bin/bash", first] and script[-1] == marker and "{{" not in submit.stdout
        assert f"#SBATCH --chdir={user}" in script
        assert f"#SBATCH --output={user}/runs/quickstart/slurm-%j.log" in script
        assert any(f" run {config} " in line for line in script), launcher
        path = user / f"{launcher}.sbatch"
        path.write_text(submit.stdout)
        syntax = _run(["bash", "-n", str(path)], user, env)
        assert syntax.returncode == 0, syntax.stderr
