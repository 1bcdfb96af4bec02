"""``python -m cli run`` as a user runs it, a real subprocess on the ``smoke`` preset: Ctrl-C in the
middle of a run, or at the end, leaves nothing running; without a terminal it answers the questions
piped to it."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from backends.local.backend import LocalBackend
from devhost.webchat import WEBCHAT_BUNDLE
from settings import AppSettings
from tests.support.devhost import PROJECT_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
FACTS = json.loads((PROJECT_ROOT / "sample_data" / "support_facts.json").read_text())
RUN_TIMEOUT_S = 600  # a smoke run takes ~2 minutes on 2 idle cores; CI shares them


class CliProcess:
    """``python -m cli run --preset smoke`` with its own devhost, state folders and HOME."""

    def __init__(self, tmp_path: Path, run_id: str, stdin_text: str | None = None):
        self.tmp_path = tmp_path
        self.run_id = run_id
        self.home = tmp_path / "home"
        self.home.mkdir()
        self.state_dir = tmp_path / "phi3"
        self.devhost_state = tmp_path / "devhost"
        env = {
            **os.environ,
            "HOME": str(self.home),
            "PHI3_STATE_DIR": str(self.state_dir),
            "PHI3_MODELS_DIR": str(PROJECT_ROOT / ".models"),
            "PHI3_BACKEND": "local",
            "PYTHONUNBUFFERED": "1",
            "COLUMNS": "160",
        }
        # Its own session, so that a signal to its process group is exactly what Ctrl-C in a
        # terminal sends (the foreground group), and never reaches pytest.
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "cli", "run", "--preset", "smoke", "--run-id", run_id),
                *("--port", "0", "--devhost-state", str(self.devhost_state)),
            ],
            cwd=PROJECT_ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        assert self.proc.stdin
        self.proc.stdin.write(stdin_text or "")
        self.proc.stdin.close()
        self.lines: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def ctrl_c(self) -> None:
        self.send(signal.SIGINT)

    def send(self, sig: signal.Signals) -> None:
        os.killpg(self.proc.pid, sig)

    def wait_exit(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)

    def wait_for(self, what: str, condition, timeout: float = RUN_TIMEOUT_S):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            exited = self.proc.poll()
            assert exited is None, f"the CLI exited ({exited}):\n{self.output[-4000:]}"
            time.sleep(0.2)
        raise TimeoutError(f"never saw {what} in {timeout}s:\n{self.output[-4000:]}")

    def _devhost_info(self) -> dict:
        try:
            return json.loads((self.devhost_state / "devhost.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def devhost_url(self) -> str | None:
        return self._devhost_info().get("url")

    def devhost_pid(self) -> int | None:
        return self._devhost_info().get("pid")

    def summary(self) -> dict | None:
        url = self.devhost_url()
        if not url:
            return None
        r = requests.get(f"{url}/api/runs/{self.run_id}", timeout=30)
        return r.json() if r.ok else None

    def pids(self) -> dict[str, int]:
        """The devhost, trainer and scoring-server processes of this run, from their state files."""
        found = {"devhost": self._devhost_info()["pid"]}
        for record in self.state_dir.glob("jobs/*/job.json"):
            found[f"trainer {record.parent.name}"] = json.loads(record.read_text())["pid"]
        for record in self.state_dir.glob("endpoints/*/server.json"):
            found[f"scoring server {record.parent.name}"] = json.loads(record.read_text())["pid"]
        return found

    def processes_still_running(self) -> list[str]:
        """Every live process whose command line names this test's folders (zombies have none)."""
        mine = str(self.tmp_path)
        alive = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            if mine in cmdline:
                alive.append(f"{proc.name}: {cmdline}")
        return alive


def is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def endpoints_left(cli: CliProcess) -> list[str]:
    root = cli.state_dir / "endpoints"
    if not root.exists():
        return []
    return [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]


def assert_nothing_left_running(cli: CliProcess, pids: dict[str, int]) -> None:
    alive = {name: pid for name, pid in pids.items() if is_alive(pid)}
    assert not alive, f"still running: {alive}\n{cli.output[-3000:]}"
    assert cli.processes_still_running() == [], cli.output[-3000:]
    assert endpoints_left(cli) == [], cli.output[-3000:]
    assert list(cli.home.iterdir()) == [], "the CLI or what it started wrote into HOME"


@pytest.fixture
def cli_process(tmp_path):
    started: list[CliProcess] = []

    def start(run_id: str, stdin_text: str | None = None) -> CliProcess:
        started.append(CliProcess(tmp_path, run_id, stdin_text))
        return started[-1]

    yield start
    for cli in started:  # a failed test must not strand the CLI, its devhost or its servers either
        if cli.proc.poll() is None:
            os.killpg(cli.proc.pid, signal.SIGKILL)
            cli.proc.wait(10)
        devhost = cli.devhost_pid()
        if devhost and any(line.startswith(f"{devhost}: ") for line in cli.processes_still_running()):
            os.killpg(devhost, signal.SIGKILL)  # still ours (not a reused pid); it leads its own session
        backend = LocalBackend(
            AppSettings(PHI3_STATE_DIR=str(cli.state_dir), PHI3_MODELS_DIR=str(PROJECT_ROOT / ".models")),
            restart_endpoints=False,
        )
        for job in backend.jobs.list():
            if job.status not in ("Completed", "Failed", "Canceled"):
                backend.jobs.cancel(job.name)
        backend.endpoints.stop_all()


def test_ctrl_c_after_the_endpoint_exists_cancels_the_run_and_leaves_nothing_running(cli_process):
    cli = cli_process("cli-interrupted")

    def endpoint_up_and_run_unfinished():
        s = cli.summary()
        if not s or s["status"] not in ("Running", "Pending"):
            return None
        steps = {step["name"]: step["status"] for step in s["steps"]}
        servers = list(cli.state_dir.glob("endpoints/*/server.json"))
        return steps.get("endpoint") == "succeeded" and servers and s

    running = cli.wait_for("the endpoint up while the run is unfinished", endpoint_up_and_run_unfinished)
    pids = cli.pids()
    assert any(name.startswith("scoring server") for name in pids), pids
    assert all(is_alive(pids[name]) for name in pids if name.startswith(("devhost", "scoring"))), pids
    cli.ctrl_c()

    assert cli.wait_exit() == 130, cli.output[-3000:]
    out = cli.output
    assert "interrupted: stopping the run and everything it started" in out
    assert "canceled run cli-interrupted" in out
    endpoint = next(name.split()[-1] for name in pids if name.startswith("scoring server"))
    assert f"deleted endpoint {endpoint}" in out
    assert "devhost stopped" in out
    assert "Traceback" not in out, out[-3000:]
    assert running["status"] in ("Running", "Pending")
    assert_nothing_left_running(cli, pids)


def test_without_a_terminal_the_cli_answers_piped_questions_and_ctrl_c_then_leaves_nothing_running(
    cli_process,
):
    question = FACTS[0]["question"]
    cli = cli_process("cli-chat", stdin_text=f"{question}\n")

    answer_line = cli.wait_for(
        "the model's answer",
        lambda: next((line for line in cli.lines if line.startswith("model> ")), None),
    )
    assert answer_line.removeprefix("model> ").strip(), "the model answered nothing"
    assert f"you> {question}" in cli.output
    assert "run cli-chat: Completed" in cli.output
    # The browser page is offered only where its bundle is installed; otherwise the CLI says how.
    browser = "chat in the browser" if WEBCHAT_BUNDLE.is_file() else "needs the Web Chat bundle"
    assert browser in cli.output, cli.output[-3000:]
    cli.wait_for("the prompt to stop", lambda: "press Ctrl-C to stop" in cli.output, timeout=30)
    pids = cli.pids()
    cli.ctrl_c()

    assert cli.wait_exit() == 0, cli.output[-3000:]
    assert "deleted endpoint" in cli.output and "devhost stopped" in cli.output
    assert "canceled run" not in cli.output  # it had completed: nothing to cancel
    assert "Traceback" not in cli.output, cli.output[-3000:]
    assert_nothing_left_running(cli, pids)


def test_without_a_terminal_each_step_is_reported_while_the_run_goes_on(cli_process):
    # A live display is drawn once, when it stops, where stdout is no terminal (`make run | tee run.log`):
    # the progress must come as lines, while the run is still going.
    cli = cli_process("cli-lines")

    def a_step_line_while_the_run_goes_on():
        printed = cli.output  # read before the status: the line was out while the run was unfinished
        summary = cli.summary()
        unfinished = summary and summary["status"] in ("Running", "Pending")
        return unfinished and "✓ data: prepare_dataset  400 valid of 400 rows" in printed

    cli.wait_for("a line for the dataset step while the run goes on", a_step_line_while_the_run_goes_on)
    cli.wait_for(
        "the training progress while it trains",
        lambda: "… fine-tune: wait_for_finetune  Running step" in cli.output,
    )
    pids = cli.pids()
    cli.ctrl_c()
    assert cli.wait_exit() == 130, cli.output[-3000:]
    assert_nothing_left_running(cli, pids)


@pytest.mark.parametrize("ending", [signal.SIGTERM, signal.SIGHUP], ids=["kill", "terminal closed"])
def test_a_kill_or_a_closed_terminal_mid_run_leaves_nothing_running_as_ctrl_c_does(ending, cli_process):
    cli = cli_process(f"cli-{ending.name.lower()}")

    def trainer_running():
        records = list(cli.state_dir.glob("jobs/*/job.json"))
        return records and is_alive(json.loads(records[0].read_text())["pid"])

    cli.wait_for("the fine-tune job's trainer running", trainer_running)
    pids = cli.pids()
    assert any(name.startswith("trainer") for name in pids), pids
    cli.send(ending)

    assert cli.wait_exit() == 130, cli.output[-3000:]
    assert f"canceled run {cli.run_id}" in cli.output, cli.output[-3000:]
    assert "devhost stopped" in cli.output
    assert_nothing_left_running(cli, pids)


# -- options ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "environment", "fragment"),
    [
        (["--port", "abc"], {}, "argument --port: 'abc' is not a port number (0-65535"),
        (["--port", "-1"], {}, "argument --port: '-1' is not a port number"),
        (["--port", "65536"], {}, "argument --port: '65536' is not a port number"),
        ([], {"DEVHOST_PORT": "abc"}, "'abc' is not a port number (0-65535; the default comes from DEVHOST"),
        (["--devhost-state", "pyproject.toml"], {}, "--devhost-state: pyproject.toml exists and is not a"),
    ],
    ids=["not a number", "negative", "past 65535", "a bad DEVHOST_PORT", "a file as the state folder"],
)
def test_a_bad_option_is_a_usage_error_naming_it(argv, environment, fragment, monkeypatch, capsys):
    from cli.__main__ import main

    monkeypatch.chdir(PROJECT_ROOT)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exited:
        main(["run", *argv])
    assert exited.value.code == 2
    assert fragment in capsys.readouterr().err


def test_help_works_even_with_a_bad_devhost_port_in_the_environment(monkeypatch, capsys):
    from cli.__main__ import main

    monkeypatch.setenv("DEVHOST_PORT", "abc")
    with pytest.raises(SystemExit) as exited:
        main(["run", "--help"])
    assert exited.value.code == 0 and "--devhost-state" in capsys.readouterr().out


def test_a_state_folder_that_cannot_be_made_is_reported_before_anything_starts(tmp_path, app_root, capsys):
    from cli.__main__ import main

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["run", "--port", "0", "--devhost-state", str(blocker / "state"), "--no-chat"]) == 2
    printed = "".join(capsys.readouterr().out.split())  # rich wraps lines to the terminal's width
    assert f"cannotmakethedevhost'sstatefolder{blocker / 'state'}:Notadirectory" in printed


@pytest.fixture
def app_root(tmp_path, monkeypatch):
    """The CLI's app folder (where it reads local.settings.json) is a temporary one, and what that file
    sets in the environment is undone afterwards."""
    from settings import get_settings

    monkeypatch.setattr("cli.__main__.PROJECT_ROOT", tmp_path)
    for name in ("PHI3_STATE_DIR", "PHI3_BACKEND", "PHI3_DEVICE"):
        monkeypatch.setenv(name, "")  # recorded, so the undo removes what the file sets
        monkeypatch.delenv(name)
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def test_the_cli_takes_local_settings_json_as_the_devhost_gives_it_to_the_app(app_root, capsys):
    # The devhost applies local.settings.json to the app; the CLI must look for the run's endpoint and
    # state where the app put them, or its chat fails and its cleanup misses the endpoint.
    from cli.__main__ import main
    from settings import get_settings

    state = app_root / "state-from-the-file"
    settings_file = {"IsEncrypted": False, "Values": {"PHI3_STATE_DIR": str(state), "PHI3_BACKEND": "local"}}
    (app_root / "local.settings.json").write_text(json.dumps(settings_file))

    assert main(["chat"]) == 1  # nothing deployed in that state folder
    assert "no endpoint with traffic" in capsys.readouterr().out
    assert get_settings().state_dir == state


def test_a_broken_local_settings_json_is_named_before_anything_starts(app_root, capsys):
    from cli.__main__ import main

    (app_root / "local.settings.json").write_text('{"Values": {')
    assert main(["run", "--port", "0", "--no-chat"]) == 2
    printed = "".join(capsys.readouterr().out.split())
    assert f"{app_root / 'local.settings.json'}:notvalidJSON" in printed


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"[]", "mustbeanobjectwhose'Values'isanobject"),
        (b'{"Values": ["PHI3_BACKEND"]}', "mustbeanobjectwhose'Values'isanobject"),
        ('{"Values": {}}'.encode("utf-16"), "notUTF-8text"),
    ],
    ids=["a list", "Values a list", "UTF-16"],
)
def test_a_local_settings_json_of_the_wrong_shape_is_named_before_anything_starts(
    content, fragment, app_root, capsys
):
    from cli.__main__ import main

    (app_root / "local.settings.json").write_bytes(content)
    assert main(["run", "--port", "0", "--devhost-state", str(app_root / "devhost"), "--no-chat"]) == 2
    printed = "".join(capsys.readouterr().out.split())
    assert f"{app_root / 'local.settings.json'}:{fragment}" in printed, printed
    assert not (app_root / "devhost").exists()  # no devhost was started


@pytest.mark.parametrize("command", [["chat"], ["run", "--port", "0", "--no-chat"]], ids=["chat", "run"])
def test_a_bad_setting_value_is_named_before_anything_starts(command, app_root, capsys):
    from cli.__main__ import main

    settings_file = {"Values": {"PHI3_DEVICE": "gpu", "PHI3_BACKEND": "local"}}
    (app_root / "local.settings.json").write_text(json.dumps(settings_file))
    if command[0] == "run":
        command = [*command, "--devhost-state", str(app_root / "devhost")]
    assert main(command) == 2
    printed = " ".join(capsys.readouterr().out.split())
    assert "the app settings are not valid" in printed, printed
    assert "PHI3_DEVICE: Input should be 'auto', 'cpu' or 'cuda'" in printed, printed
    assert not (app_root / "devhost").exists()  # no devhost was started


def test_chat_names_the_missing_azure_setting_instead_of_a_traceback(app_root, monkeypatch, capsys):
    from cli.__main__ import main

    for name in ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZURE_ML_WORKSPACE", "AZURE_LOCATION"):
        monkeypatch.delenv(name, raising=False)
    (app_root / "local.settings.json").write_text(json.dumps({"Values": {"PHI3_BACKEND": "azure"}}))
    assert main(["chat"]) == 1
    printed = " ".join(capsys.readouterr().out.split())
    assert "set the app setting AZURE_SUBSCRIPTION_ID" in printed, printed


# -- a port another program holds -------------------------------------------------------------------
class _WebPage(http.server.BaseHTTPRequestHandler):
    """A web server that is not a devhost: every path is an HTML page."""

    def do_GET(self):
        body = b"<html><body>someone else's app</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def web_server_on_a_port():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _WebPage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def silent_port():
    """A port that takes connections and never answers them."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


@pytest.mark.parametrize("holder", ["web_server_on_a_port", "silent_port"])
def test_a_port_held_by_something_that_is_not_a_devhost_is_named_with_the_way_out(
    holder, request, tmp_path, app_root, capsys
):
    from cli.__main__ import main

    port = request.getfixturevalue(holder)
    argv = ["run", "--port", str(port), "--devhost-state", str(tmp_path / "devhost"), "--no-chat"]
    assert main(argv) == 2
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps lines to the terminal's width
    assert f"the devhost exited (code 2): cannot listen on 127.0.0.1:{port}" in printed, printed
    assert f"port {port} is taken by something that is not a devhost: pass --port 0" in printed, printed


@pytest.mark.parametrize("started_here", [False, True])
def test_an_endpoint_a_reused_devhost_keeps_elsewhere_is_named_not_passed_over(
    tmp_path, monkeypatch, started_here
):
    # A devhost already on the port may be another checkout's, or run with another PHI3_STATE_DIR: the
    # endpoint it reported is then not in this CLI's state, and must not go unmentioned.
    import io

    from rich.console import Console

    from cli.cleanup import RunResources, _stop_resources
    from settings import get_settings

    monkeypatch.setenv("PHI3_STATE_DIR", str(tmp_path / "ours"))
    get_settings.cache_clear()
    out = io.StringIO()
    try:
        _stop_resources(
            RunResources(job=None, endpoint="phi3ft-elsewhere"),
            "Completed",
            False,
            Console(file=out, width=300),
            elsewhere=not started_here,
        )
    finally:
        get_settings.cache_clear()

    said = out.getvalue()
    if started_here:  # our own devhost's state: not there means the run never made it, or deleted it
        assert said == ""
    else:
        assert f"endpoint phi3ft-elsewhere is not in {tmp_path / 'ours'}" in said
