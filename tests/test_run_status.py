"""The run's Durable custom status stays under the extension's 16 KB however long the run's texts get,
and the summary built from it still lists every step, its stage and the error.

The limit itself (what the host refuses, and that the orchestration then fails) is the devhost's
emulation of the extension, proven in tests/test_devhost_durable.py; the smoke run on the devhost
(tests/test_pipeline_e2e.py) would fail at its last steps without the view.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from backends.protocol import ResourceRef
from devhost.durable.engine import custom_status_error
from pipeline.steps import STEP_ORDER, STEP_STAGE, RunProgress, StepResult
from pipeline.summary import SHOWN_OUTPUTS, build_summary, status_view

T0 = datetime(2026, 12, 6, 6, 0, 0, 123456, tzinfo=UTC)


def progress(summary_chars: int, *, fail_at: str | None = None, created: int = 10) -> RunProgress:
    """A run through every step (up to ``fail_at``), each summary ``summary_chars`` long."""
    run = RunProgress.start("ft-20261206-060000-abcdef", "azure", "demo", {"endpoint": "phi3ft-abcdef"})
    for i, name in enumerate(STEP_ORDER):
        run.begin(name, T0 + timedelta(minutes=i))
        if name == fail_at:
            run.fail(name, "Azure said: " + "the quota is exhausted; " * 200)
            break
        outputs = {"dataset": {"rows_valid": 400, "train_file": {"path": "/tmp/" + "d" * 300}}}
        outputs |= {f"{name}_internal": {"state": "s" * 400}, "endpoint": {"name": "phi3ft-abcdef"}}
        run.finish(
            name,
            StepResult(summary=f"{name}: " + "é" * summary_chars, outputs=outputs),
            T0 + timedelta(minutes=i, seconds=30),
        )
    run.record_created(
        [ResourceRef(kind="role_assignment", name=f"ra-{i:04d}", parent="ws") for i in range(created)]
    )
    return run


def test_a_small_run_is_published_whole_but_for_the_outputs_only_later_steps_read():
    run = progress(20)
    view = status_view(run)
    full = run.model_dump(mode="json", exclude_none=True)

    assert "abridged" not in view
    assert view["steps"] == full["steps"] and view["created"] == full["created"]
    assert set(view["outputs"]) == {"dataset", "endpoint"} <= set(SHOWN_OUTPUTS)
    assert view["outputs"]["dataset"] == full["outputs"]["dataset"]


def test_long_step_texts_are_cut_to_fit_and_the_summary_still_shows_every_step():
    run = progress(2000)  # 22 summaries of 2,000 non-ASCII characters: ~90 KB of UTF-16
    assert custom_status_error(run.model_dump(mode="json", exclude_none=True))  # the host would refuse it

    view = status_view(run)

    assert custom_status_error(view) is None
    summary = build_summary(run.run_id, {"runtimeStatus": "Running", "customStatus": view}, {})
    assert summary.abridged
    assert [(s["name"], s["stage"], s["status"]) for s in summary.steps] == [
        (name, STEP_STAGE[name], "succeeded") for name in STEP_ORDER
    ]
    assert all(s["summary"].startswith(s["name"]) for s in summary.steps)
    assert summary.steps[0]["started"] == "2026-12-06T06:00:00+00:00"  # whole seconds, still ISO 8601
    assert summary.endpoint == {"name": "phi3ft-abcdef"}


def test_a_failed_run_keeps_its_error_and_what_it_created_first():
    run = progress(3000, fail_at="deployment", created=400)

    view = status_view(run)

    assert custom_status_error(view) is None
    summary = build_summary(run.run_id, {"runtimeStatus": "Failed", "customStatus": view}, {})
    assert summary.error["step"] == "deployment"
    assert summary.error["message"].startswith("Azure said: the quota is exhausted")
    assert summary.current_step == "deployment"
    assert [r["name"] for r in summary.created_resources[:2]] == ["ra-0000", "ra-0001"]
    assert len(summary.created_resources) + summary.created_not_shown == 400
    assert summary.abridged


def test_when_nothing_else_fits_the_status_names_the_step_and_the_error():
    run = progress(10, fail_at="traffic")

    view = status_view(run, budget=6000)

    assert set(view) == {
        "run_id",
        "backend",
        "preset",
        "status",
        "stage",
        "current_step",
        "error",
        "steps",
        "abridged",
    }
    assert view["error"]["step"] == "traffic" and len(view["error"]["message"]) <= 2000
    assert view["steps"][STEP_ORDER.index("traffic")] == {"name": "traffic", "status": "failed"}


def test_a_run_without_a_status_yet_lists_every_step_as_still_to_come():
    summary = build_summary("ft-new", {"runtimeStatus": "Pending", "customStatus": None}, {})

    assert [(s["name"], s["stage"], s["status"]) for s in summary.steps] == [
        (name, STEP_STAGE[name], "pending") for name in STEP_ORDER
    ]


def test_the_view_is_a_function_of_the_progress_alone():
    assert status_view(progress(2000)) == status_view(progress(2000))


def running_at(step: str) -> RunProgress:
    """A run whose steps up to ``step`` succeeded and ``step`` is under way."""
    run = RunProgress.start("ft-again", "local", "smoke", {"job": "ft-again-job"})
    for i, name in enumerate(STEP_ORDER):
        run.begin(name, T0 + timedelta(minutes=i))
        if name == step:
            break
        run.finish(name, StepResult(summary="done"), T0 + timedelta(minutes=i, seconds=30))
    return run


# What a previous attempt's monitor <run>:wait_for_finetune still holds when the run id is re-submitted.
OLD_JOB_WAIT = {"polls": 40, "status": "Completed", "step": 120, "total_steps": 120, "train_loss": 0.42}


def test_a_resubmitted_run_does_not_show_the_previous_attempts_job_before_it_reaches_the_wait():
    view = status_view(running_at("prepare_dataset"))

    summary = build_summary(
        "ft-again", {"runtimeStatus": "Running", "customStatus": view}, {"wait_for_finetune": OLD_JOB_WAIT}
    )

    assert summary.job == {"name": "ft-again-job"}
    assert all("live" not in step for step in summary.steps)


def test_the_live_wait_of_the_run_is_shown_once_it_reached_the_wait():
    view = status_view(running_at("wait_for_finetune"))
    live = {"polls": 3, "status": "Running", "step": 7, "total_steps": 120, "train_loss": 1.9}

    summary = build_summary(
        "ft-again", {"runtimeStatus": "Running", "customStatus": view}, {"wait_for_finetune": live}
    )

    assert summary.job == {"name": "ft-again-job", **live}
    assert summary.steps[STEP_ORDER.index("wait_for_finetune")]["live"] == live


def test_a_run_canceled_mid_step_shows_that_step_ended_not_running():
    view = status_view(running_at("wait_for_finetune"))
    status = {"runtimeStatus": "Terminated", "customStatus": view, "output": "canceled by user"}

    summary = build_summary("ft-again", status, {"wait_for_finetune": {"polls": 3, "status": "Running"}})

    step = summary.steps[STEP_ORDER.index("wait_for_finetune")]
    assert (step["status"], step["error"]) == ("failed", "canceled: canceled by user")
    assert not [s["name"] for s in summary.steps if s["status"] == "running"]
    assert summary.error == {"step": "wait_for_finetune", "message": "canceled: canceled by user"}
