"""What piles up on a device is pruned by the collection's modules, run through Ansible itself.

Each test lays out a device prefix on disk the way the roles leave it (releases with their links, failed
release records written by dualdeploy-ctl, server code versions, an installed wheelhouse), runs the module
with `ansible localhost -m`, and checks what is left. The edge lab (tests/test_edge_lab.py) rolls back on a
real device after the pruning of a real rollout.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from edge_support import BIN, ansible_env, run_ansible


def _module(name: str, **args: object) -> dict[str, object]:
    run = run_ansible(
        "ansible", "localhost", "-c", "local", "-m", f"dualdeploy.edge.{name}", "-a", json.dumps(args), "-o"
    )
    # One line: "localhost | CHANGED => {...}" (or SUCCESS).
    return dict(json.loads(run.stdout.split("=>", 1)[1]))


def _folder(path: Path, age_s: float) -> Path:
    path.mkdir(parents=True)
    (path / "manifest.json").write_text("{}")
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def _release_tree(prefix: Path) -> Path:
    releases = prefix / "releases"
    for version, age in (("v1", 400), ("v2", 300), ("v3", 200), ("v4", 100)):
        _folder(releases / version, age)
    return releases


def test_release_prune_keeps_current_previous_and_new_and_failed_ones_do_not_count(tmp_path: Path) -> None:
    prefix = tmp_path / "opt"
    releases = _release_tree(prefix)
    (prefix / "current").symlink_to("releases/v2")
    (prefix / "previous").symlink_to("releases/v1")
    failed = prefix / "var" / "failed"
    failed.mkdir(parents=True)
    (failed / "v4.json").write_text(json.dumps({"version": "v4", "reason": "failed the health gate"}))
    (releases / ".staging-v9").mkdir()
    result = _module(
        "release_prune",
        releases_dir=str(releases),
        keep=2,
        protect=[str(prefix / "current"), str(prefix / "previous")],
        protect_versions=["v5"],
        failed_dir=str(failed),
    )
    # Good ones by age: v3, v2, v1 -> keep v3 and v2; v1 is previous; v4 failed and is not protected.
    assert sorted(p.name for p in releases.iterdir()) == ["v1", "v2", "v3"]
    assert result["removed"] == [".staging-v9", "v4"]
    assert not (failed / "v4.json").exists(), "the record goes with its release"


def test_release_prune_never_removes_a_failed_release_that_a_link_protects(tmp_path: Path) -> None:
    prefix = tmp_path / "opt"
    releases = _release_tree(prefix)
    (prefix / "current").symlink_to("releases/v4")
    failed = prefix / "var" / "failed"
    failed.mkdir(parents=True)
    (failed / "v4.json").write_text("{}")
    _module(
        "release_prune",
        releases_dir=str(releases),
        keep=2,
        protect=[str(prefix / "current")],
        failed_dir=str(failed),
    )
    assert sorted(p.name for p in releases.iterdir()) == ["v2", "v3", "v4"]


def test_code_prune_keeps_current_and_newest_code_and_drops_an_installed_wheelhouse(tmp_path: Path) -> None:
    prefix = tmp_path / "opt"
    app = prefix / "app"
    for name, age in (("aaa", 500), ("bbb", 400), ("ccc", 300), ("ddd", 200)):
        _folder(app / name, age)
    (app / "current").symlink_to("aaa")  # an old version in use (a rollback of the code link)
    runtime = prefix / "runtime"
    (runtime / "wheels").mkdir(parents=True)
    (runtime / "wheels" / "x.whl").write_bytes(b"wheel")
    (runtime / "wheelhouse.tar").write_bytes(b"tar")
    (runtime / "requirements.txt").write_text("numpy\n")
    (prefix / "venv").mkdir()
    (prefix / "venv" / ".dualdeploy-runtime-h1").write_text("h1\n")
    result = _module("code_prune", prefix=str(prefix), keep=2, runtime_hash="h1")
    assert sorted(p.name for p in app.iterdir()) == ["aaa", "ccc", "current", "ddd"]
    removed = result["removed"]
    assert isinstance(removed, list)
    assert sorted(removed) == ["app/bbb", "runtime/wheelhouse.tar", "runtime/wheels"]
    assert (runtime / "requirements.txt").exists()


def test_code_prune_keeps_a_wheelhouse_the_venv_was_not_installed_from(tmp_path: Path) -> None:
    prefix = tmp_path / "opt"
    (prefix / "runtime" / "wheels").mkdir(parents=True)
    (prefix / "runtime" / "wheelhouse.tar").write_bytes(b"tar")
    (prefix / "venv").mkdir()
    (prefix / "venv" / ".dualdeploy-runtime-old").write_text("old\n")
    result = _module("code_prune", prefix=str(prefix), keep=2, runtime_hash="new")
    assert result["removed"] == [] and result["changed"] is False
    assert (prefix / "runtime" / "wheelhouse.tar").exists()


@pytest.mark.parametrize("module", ["code_prune", "release_prune"])
def test_keep_below_two_is_refused_by_name(tmp_path: Path, module: str) -> None:
    args: dict[str, object] = {"keep": 1}
    if module == "code_prune":
        args.update(prefix=str(tmp_path), runtime_hash="h")
    else:
        args.update(releases_dir=str(tmp_path))
    # The failing run, without run_ansible's success check.
    run = subprocess.run(
        [
            str(BIN / "ansible"),
            "localhost",
            "-c",
            "local",
            "-m",
            f"dualdeploy.edge.{module}",
            "-a",
            json.dumps(args),
        ],
        capture_output=True,
        text=True,
        check=False,
        env=ansible_env(),
        timeout=120,
    )
    assert run.returncode != 0
    assert "keep=1: must be at least 2" in run.stdout
