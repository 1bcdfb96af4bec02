"""The Makefile's entry points on a machine without Node.js: ``make run`` must still work there."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.support.devhost import PROJECT_ROOT

MAKE = shutil.which("make")


@pytest.mark.skipif(MAKE is None, reason="make is not installed")
def test_webchat_without_npm_is_skipped_with_a_hint_and_the_make_goes_on(tmp_path):
    bin_dir = tmp_path / "bin"  # a PATH with a shell and no npm; make runs by its full path
    bin_dir.mkdir()
    for tool in ("bash", "sh"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {**os.environ, "PATH": str(bin_dir)}
    done = subprocess.run(
        [MAKE, "--no-print-directory", "webchat"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "npm not found: skipping the Web Chat bundle" in done.stdout
    assert "make webchat" in done.stdout  # says how to get the browser page later


@pytest.mark.skipif(MAKE is None or shutil.which("npm") is None, reason="make or npm is not installed")
def test_webchat_with_npm_installs_the_pinned_bundle():
    plan = subprocess.run(
        [MAKE, "--no-print-directory", "-n", "-B", "webchat"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert plan.returncode == 0, plan.stderr
    assert "npm ci --ignore-scripts" in plan.stdout, plan.stdout  # from the inner make, dry-run
