"""The devhost refuses broken apps with a message that says what to fix, never a hang or traceback."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.support.devhost import PROJECT_ROOT

HEADER = "import azure.functions as func\nimport azure.durable_functions as df\n"


def run_devhost(app_dir, timeout=60):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "devhost",
            "--root",
            str(app_dir),
            "--port",
            "0",
            "--state",
            str(app_dir / ".st"),
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def make_app(tmp_path, body: str, settings: str | None = None):
    (tmp_path / "function_app.py").write_text(HEADER + textwrap.dedent(body))
    if settings is not None:
        (tmp_path / "local.settings.json").write_text(settings)
    return tmp_path


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "raise RuntimeError('missing setting FOO')\n",
            "importing .* failed at function_app.py:3: RuntimeError: missing setting FOO",
        ),
        ("x = 1\n", "defines no FunctionApp"),
        ("a = func.FunctionApp()\nb = func.FunctionApp()\n", "defines 2 FunctionApp objects"),
        (
            """
            app = func.FunctionApp()
            @app.route(route="runs/{id}")
            def one(req): return "1"
            @app.route(route="runs/{name}")
            def two(req): return "2"
            """,
            "route clash: functions 'one' and 'two'",
        ),
        (
            """
            app = df.DFApp()
            @app.route(route="start")
            @app.durable_client_input(client_name="client")
            def start(req, client): return "x"
            """,
            "must be `async def`",
        ),
        (
            """
            app = func.FunctionApp()
            @app.timer_trigger(schedule="*/5 * * * *", arg_name="t")
            def tick(t): pass
            """,
            "NCRONTAB needs exactly 6",
        ),
    ],
    ids=["import-error", "no-app", "two-apps", "route-clash", "sync-client", "five-field-cron"],
)
def test_broken_apps_fail_fast_with_a_clear_message(tmp_path, body, message):
    result = run_devhost(make_app(tmp_path, body))
    assert result.returncode == 2
    assert "devhost: cannot load the app" in result.stderr
    assert "Traceback" not in result.stderr
    import re

    assert re.search(message, result.stderr), result.stderr


def test_missing_function_app_file_is_explained(tmp_path):
    result = run_devhost(tmp_path)
    assert result.returncode == 2 and "no function_app.py" in result.stderr


def test_invalid_local_settings_json_names_the_file(tmp_path):
    result = run_devhost(make_app(tmp_path, "app = func.FunctionApp()\n", settings="{not json"))
    assert result.returncode == 2 and "local.settings.json: not valid JSON" in result.stderr


def test_local_settings_values_reach_the_app_before_import(tmp_path, monkeypatch):
    from devhost.app_loader import load_app

    monkeypatch.delenv("GREETING", raising=False)
    make_app(
        tmp_path,
        """
        import os
        GREETING = os.environ["GREETING"]
        app = func.FunctionApp()
        @app.route(route="hi")
        def hi(req): return GREETING
        """,
        settings='{"IsEncrypted": false, "Values": {"GREETING": "hello from settings"}}',
    )
    index = load_app(tmp_path)
    assert index.function("hi").user_function(None) == "hello from settings"
    monkeypatch.delenv("GREETING")
