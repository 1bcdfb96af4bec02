"""bench/device_kit.sh, the kit that carries wheels to the lent GPU machine and runs the GPU benchmark
there: what can be checked without the network or a GPU (its plan, its usage, and `run`'s plumbing
with a stand-in python3)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
KIT = PROJECT_ROOT / "bench" / "device_kit.sh"
BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="bash is not installed")


def kit(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    inherited = {
        k: v for k, v in os.environ.items() if k not in ("OUT", "PYTHON") and not k.startswith("DEVICE_KIT_")
    }
    return subprocess.run(
        [BASH, str(KIT), *args],
        cwd=PROJECT_ROOT,
        env={**inherited, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def pinned(name: str) -> str:
    text = (PROJECT_ROOT / "constraints.txt").read_text(encoding="utf-8")
    return re.search(rf"^{re.escape(name)}==(\S+)$", text, re.MULTILINE | re.IGNORECASE).group(1)


def test_the_plan_downloads_the_versions_constraints_txt_pins_as_cp312_manylinux_wheels():
    done = kit("plan")

    assert done.returncode == 0, done.stderr
    for name in ("transformers", "peft", "tokenizers"):
        assert f"{name}=={pinned(name)}" in done.stdout
    liger = re.search(r"liger-kernel==([\w.]+)", (PROJECT_ROOT / "backends/local/accelerator.py").read_text())
    assert f"liger-kernel=={liger.group(1)}" in done.stdout  # the version the install hint names
    command = done.stdout.split("download command:")[1]
    assert "pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp" in command
    assert "--platform manylinux_2_17_x86_64" in command and f"-d {PROJECT_ROOT / '.whl'} " in command


def test_the_plan_follows_the_constraints_file_whatever_its_spelling(tmp_path):
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(
        "# pins\nTransformers==9.1.0  # comment\npeft == 8.2.0\nsome_other==1.0\ntokenizers==7.3.0\n",
        encoding="utf-8",
    )

    done = kit("plan", DEVICE_KIT_CONSTRAINTS=str(constraints), DEVICE_KIT_WHEELS=str(tmp_path / "w"))

    assert done.returncode == 0, done.stderr
    assert "transformers==9.1.0 peft==8.2.0 tokenizers==7.3.0 liger-kernel==" in done.stdout
    assert f"-d {tmp_path / 'w'} " in done.stdout


def test_a_package_missing_from_the_constraints_stops_the_kit_naming_it(tmp_path):
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("transformers==9.1.0\ntokenizers==7.3.0\n", encoding="utf-8")

    done = kit("download", DEVICE_KIT_CONSTRAINTS=str(constraints), DEVICE_KIT_WHEELS=str(tmp_path / "w"))

    assert done.returncode != 0
    assert "peft is not pinned" in done.stderr
    assert not (tmp_path / "w").exists()  # nothing was fetched


@pytest.mark.parametrize("args", [["unpack"], []])
def test_an_unknown_or_missing_verb_fails_with_the_usage(args):
    done = kit(*args)

    assert done.returncode == 2
    assert "usage: bench/device_kit.sh plan | download | run" in done.stderr
    if args:
        assert "unknown verb 'unpack'" in done.stderr


@pytest.fixture
def fake_python(tmp_path: Path) -> Path:
    """A python3 that logs how it was called: pip installs succeed, the bench exits 3."""
    script = tmp_path / "python3"
    script.write_text(
        "#!/usr/bin/env bash\n"
        'echo "fake python3 $*" >>"$CALLS"\n'
        'case "$1 $2" in\n'
        '  "- ") cat >/dev/null; echo "transformers 0.0-fake";;\n'
        '  "-m pip") ;;\n'
        '  "-m bench.trainer_gpu") echo "bench saw PYTHONPATH=$PYTHONPATH"; exit 3;;\n'
        "esac\n",
        encoding="utf-8",
    )
    script.chmod(0o755)
    return script


def test_run_installs_the_wheels_then_runs_the_bench_with_its_arguments_and_keeps_its_exit_code(
    tmp_path, fake_python
):
    wheels, out, calls = tmp_path / "wheels", tmp_path / "out", tmp_path / "calls.txt"
    wheels.mkdir()
    for name in ("peft-1.0-py3-none-any.whl", "liger_kernel-1.0-py3-none-any.whl"):
        (wheels / name).write_bytes(b"")

    done = kit(
        "run",
        "--cpu-smoke",
        "--variants",
        PYTHON=str(fake_python),
        CALLS=str(calls),
        OUT=str(out),
        DEVICE_KIT_WHEELS=str(wheels),
        DEVICE_KIT_SITE=str(tmp_path / "site"),
        DEVICE_KIT_SKIP="liger_kernel",
    )

    assert done.returncode == 3, done.stdout + done.stderr
    log = (out / "device_log.txt").read_text(encoding="utf-8")
    assert log == done.stdout and "transformers 0.0-fake" in log and "exit code 3" in log
    assert f"bench saw PYTHONPATH={PROJECT_ROOT}:{tmp_path / 'site'}" in log
    pip, _versions, bench, tests = calls.read_text(encoding="utf-8").splitlines()
    assert "-m pip install -q --no-index --no-deps" in pip and f"--target {tmp_path / 'site'}" in pip
    assert "peft-1.0-py3-none-any.whl" in pip and "liger_kernel" not in pip  # DEVICE_KIT_SKIP
    assert bench == "fake python3 -m bench.trainer_gpu --no-tests --cpu-smoke --variants"
    # The GPU tests run in a process of their own once the bench's has given the card's memory back.
    assert tests.startswith("fake python3 -m pytest -m gpu and not slow tests/test_gpu.py -q")
    assert "bench exit code 3, tests exit code 0" in log


def test_run_without_wheels_refuses_unless_told_to_use_the_image_as_it_is(tmp_path, fake_python):
    # Forgetting to carry .whl would measure the image's transformers, without liger: other figures.
    calls = tmp_path / "calls.txt"
    common = {"PYTHON": str(fake_python), "CALLS": str(calls), "DEVICE_KIT_WHEELS": str(tmp_path / "none")}

    refused = kit("run", **common)

    assert refused.returncode == 1 and 'carry .whl to the device (carry: [".whl"])' in refused.stdout
    assert not calls.exists()  # nothing ran
    done = kit("run", DEVICE_KIT_ALLOW_IMAGE="1", **common)
    assert done.returncode == 3
    assert "no wheels in" in done.stdout and "using the image's packages" in done.stdout
    assert not any(" -m pip " in line for line in calls.read_text(encoding="utf-8").splitlines())


def test_run_starts_from_a_fresh_site_folder_and_leaves_a_foreign_one_alone(tmp_path, fake_python):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    (wheels / "peft-1.0-py3-none-any.whl").write_bytes(b"")
    site.mkdir()
    (site / "stale_liger").mkdir()  # what an earlier run on a warm machine installed
    (site / ".device_kit").touch()
    common = {
        "PYTHON": str(fake_python),
        "CALLS": str(tmp_path / "calls.txt"),
        "DEVICE_KIT_WHEELS": str(wheels),
    }

    done = kit("run", DEVICE_KIT_SITE=str(site), **common)

    assert done.returncode == 3 and not (site / "stale_liger").exists()
    foreign = tmp_path / "foreign"
    (foreign / "keep").mkdir(parents=True)
    refused = kit("run", DEVICE_KIT_SITE=str(foreign), **common)
    assert refused.returncode == 1 and "is not the kit's own" in refused.stdout
    assert (foreign / "keep").exists()
