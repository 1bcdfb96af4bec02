"""promptflow as a well-behaved library: imported lazily, configured once before import, never writing
HOME, never leaving a process behind, never logging user text or the key. Each check runs a fresh
Python process, since promptflow's configuration is read once per process."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from flows.environment import key_file, promptflow_environment
from tests.test_flow_runner import KEY, ScoringStub

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PF = Path(sys.executable).parent / "pf"
QUESTION = "zebra-question-7 about the Aero purifier"

# One whole local session: the connection step, a flow turn with history, evaluation through the flow.
SESSION = """
import json, logging, sys
from pathlib import Path
logging.basicConfig(level=logging.DEBUG)  # the host may log everything: promptflow still must not say much
state_dir, uri, key, question = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
from flows.connections import upsert_connection
from flows.runner import FlowRunner
from pipeline.evaluation import evaluate_answers
upsert_connection("phi3-endpoint", uri, key, state_dir=state_dir)
runner = FlowRunner(uri, key, state_dir=state_dir)
history = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
answer = runner.answer_sync(question, history)
cases = [([{"role": "user", "content": question}], "echo(1): " + question)]
rows = evaluate_answers(cases, runner.answer_conversation)
print(json.dumps({"answer": answer, "rouge_l": rows[0].rouge_l}))
"""


@pytest.fixture(scope="module")
def stub() -> Iterator[ScoringStub]:
    server = ScoringStub().start()
    yield server
    server.stop()


@pytest.fixture
def sandbox(tmp_path: Path) -> dict[str, Path]:
    paths = {name: tmp_path / name for name in ("home", "tmp", "state")}
    for path in paths.values():
        path.mkdir()
    return paths


def child_env(sandbox: dict[str, Path]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PF_", "PYTHON_KEYRING", "XDG_"))}
    return {
        **env,
        "HOME": str(sandbox["home"]),
        "TMPDIR": str(sandbox["tmp"]),
        "PHI3_STATE_DIR": str(sandbox["state"]),
        "PYTHONPATH": str(PROJECT_ROOT),
    }


def python(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def promptflow_processes() -> set[tuple[int, str]]:
    """Live processes that are promptflow's (the pfs trace service runs under waitress-serve)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if state != "Z" and ("promptflow" in cmdline or "waitress-serve" in cmdline or "/pfs" in cmdline):
            found.add((int(entry.name), cmdline))
    return found


# -- lazy import ------------------------------------------------------------------------------------
def test_importing_the_function_app_does_not_import_promptflow():
    done = python("""
        import sys
        import function_app, flows.runner, flows.connections, pipeline.evaluation
        loaded = sorted(
            m for m in sys.modules if m.split(".")[0] == "promptflow" or m.startswith("azure.ai.evaluation")
        )
        print(loaded[:5])
        sys.exit(1 if loaded else 0)
    """)
    assert done.returncode == 0, done.stdout + done.stderr


def test_configuring_after_promptflow_was_imported_is_refused_with_the_fix(tmp_path):
    done = python(
        """
        import sys
        from pathlib import Path
        import promptflow.client
        from flows.environment import configure_promptflow
        configure_promptflow(Path(sys.argv[1]))
        """,
        str(tmp_path),
    )
    assert done.returncode != 0
    assert "import it lazily" in done.stderr


def test_a_second_state_directory_after_import_is_refused_instead_of_ignored(tmp_path):
    done = python(
        """
        import sys
        from pathlib import Path
        from flows.environment import configure_promptflow
        configure_promptflow(Path(sys.argv[1]) / "a")
        import promptflow.client
        configure_promptflow(Path(sys.argv[1]) / "a")  # the same one again is fine
        configure_promptflow(Path(sys.argv[1]) / "b")
        """,
        str(tmp_path),
    )
    assert done.returncode != 0
    assert "one state directory per process" in done.stderr


def test_an_existing_pf_yaml_keeps_its_settings_but_telemetry_and_tracing_are_forced_off(tmp_path):
    config = tmp_path / "promptflow" / "pf.yaml"
    config.parent.mkdir()
    config.write_text(
        "telemetry:\n  enabled: true\ncli:\n  installation_id: abc\ntrace:\n  destination: azureml\n"
    )

    done = python("import sys; from pathlib import Path; from flows.environment import configure_promptflow; "
                  "configure_promptflow(Path(sys.argv[1]))", str(tmp_path))  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(config.read_text()) == {
        "telemetry": {"enabled": False},
        "cli": {"installation_id": "abc"},
        "trace": {"destination": "none"},
    }


def test_a_loose_key_file_is_tightened_to_owner_only(tmp_path):
    loose = key_file(tmp_path)
    loose.parent.mkdir(parents=True)
    loose.write_text("[promptflow]\n")
    loose.chmod(0o644)

    done = python("import sys; from pathlib import Path; from flows.environment import configure_promptflow; "
                  "configure_promptflow(Path(sys.argv[1]))", str(tmp_path))  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(loose.stat().st_mode) == 0o600
    assert loose.read_text() == "[promptflow]\n"  # kept: it holds the store's encryption key


# -- a whole session --------------------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_a_whole_session_leaves_home_empty_logs_no_user_text_or_key_and_no_process_behind(
    sandbox, stub, tmp_path
):
    before = promptflow_processes()
    env = child_env(sandbox)

    session = python(SESSION, str(sandbox["state"]), stub.uri(), KEY, QUESTION, env=env)
    assert session.returncode == 0, session.stderr[-3000:]
    assert json.loads(session.stdout.splitlines()[-1]) == {"answer": f"echo(3): {QUESTION}", "rouge_l": 1.0}

    flow_copy = tmp_path / "phi3_chat"
    subprocess.run(["cp", "-r", str(PROJECT_ROOT / "flows" / "phi3_chat"), str(flow_copy)], check=True)
    cli_env = {**env, **promptflow_environment(sandbox["state"])}
    cli = subprocess.run(
        [str(PF), "flow", "test", "--flow", str(flow_copy), "--inputs", f"question={QUESTION}"],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    assert cli.returncode == 0, cli.stderr[-3000:]

    assert list(sandbox["home"].rglob("*")) == []
    assert promptflow_processes() - before == set()
    everything_printed = session.stdout + session.stderr + cli.stdout + cli.stderr
    assert KEY not in everything_printed
    assert QUESTION not in session.stderr  # the host's DEBUG logging shows no user text from promptflow
    assert stat.S_IMODE(key_file(sandbox["state"]).stat().st_mode) == 0o600


def test_a_lost_key_file_is_recovered_by_storing_the_current_key_again(sandbox):
    store = """
        import sys
        from pathlib import Path
        from flows.connections import upsert_connection
        uri, key, state_dir = "http://127.0.0.1:5/score", sys.argv[2], Path(sys.argv[1])
        print(upsert_connection("phi3-endpoint", uri, key, state_dir=state_dir).action)
    """
    env = child_env(sandbox)
    first = python(store, str(sandbox["state"]), KEY, env=env)
    assert first.stdout.split() == ["created"], first.stderr
    key_file(sandbox["state"]).unlink()  # the old secret can no longer be decrypted

    again = python(store, str(sandbox["state"]), KEY + "-new", env=env)
    read = python(
        """
        import sys
        from pathlib import Path
        from flows.environment import configure_promptflow
        configure_promptflow(Path(sys.argv[1]))
        from promptflow.client import PFClient
        print(PFClient().connections.get("phi3-endpoint").secrets["key"] == sys.argv[2])
        """,
        str(sandbox["state"]),
        KEY + "-new",
        env=env,
    )

    assert again.stdout.split() == ["updated"], again.stderr
    assert read.stdout.split() == ["True"], read.stderr
