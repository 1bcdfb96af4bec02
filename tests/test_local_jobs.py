"""Local fine-tune jobs run as detached trainer processes that any host process can watch and cancel.

The end-to-end job trains tiny-phi3 on made-up facts and must answer them afterwards through the
MLflow pyfunc model it logged, so a trainer that learns nothing, or a model that answers with the
prompt, fails here.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from backends.local.jobs import TERMINAL_STATES, JobInfo, JobNotFoundError, LocalJobRunner
from tests.support.fact_data import tiny_spec, write_fact_dataset
from tests.support.polling import wait_for


def wait_for_end(runner: LocalJobRunner, name: str, timeout: float = 540) -> JobInfo:
    wait_for(lambda: runner.get(name).status in TERMINAL_STATES, timeout=timeout, what=f"job {name} to end")
    return runner.get(name)


def trainer_pids(job_dir: Path) -> list[int]:
    """Live trainer processes whose command line names this job folder."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited while we looked
        if b"backends.local.trainer" in argv and str(job_dir).encode() in argv and state != "Z":
            pids.append(int(entry.name))
    return pids


@contextmanager
def tracking_uri_set(uri: str) -> Iterator[None]:
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def facts_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    return path, write_fact_dataset(path, rows=360, facts=20, seed=7)


@pytest.fixture(scope="module")
def completed_job(tmp_path_factory, tracking_uri, facts_file) -> tuple[LocalJobRunner, JobInfo]:
    work = tmp_path_factory.mktemp("workspace")
    train_file, _ = facts_file
    validation_file = work / "validation.jsonl"
    write_fact_dataset(validation_file, rows=40, facts=20, seed=7)
    runner = LocalJobRunner(work)
    runner.submit("facts", tiny_spec(work, tracking_uri, train_file, validation_file=validation_file))
    return runner, wait_for_end(runner, "facts")


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[LocalJobRunner]:
    runner = LocalJobRunner(tmp_path / "workspace", cancel_grace_seconds=20)
    yield runner
    for job in runner.list():
        runner.cancel(job.name)  # never leave a trainer behind


@pytest.fixture
def long_job(runner, tmp_path, tracking_uri, facts_file) -> JobInfo:
    """A job that trains far longer than any test waits, observed once it is Running."""
    spec = tiny_spec(tmp_path, tracking_uri, facts_file[0], num_train_epochs=500, job_name="long")
    runner.submit("long", spec)
    wait_for(lambda: runner.get("long").status == "Running", timeout=300, what="job long to be Running")
    return runner.get("long")


@pytest.mark.slow
def test_a_tiny_job_completes_and_fills_every_status_field(completed_job):
    _, job = completed_job

    assert job.status == "Completed", job.error
    assert job.step == job.total_steps > 0 and job.epoch == 10
    assert job.train_loss is not None and job.eval_loss is not None and job.tokens_per_second > 0
    assert job.model_uri.startswith("models:/") and job.mlflow_run_id and job.device == "cpu"
    assert job.started_at < job.ended_at and job.error is None
    assert (job.job_dir / "outputs" / "model" / "config.json").is_file()
    assert "trained" in job.log_path.read_text()


@pytest.mark.slow
def test_a_tiny_job_logs_its_metrics_params_and_model_to_one_mlflow_run(completed_job, tracking_uri):
    _, job = completed_job
    client = MlflowClient(tracking_uri)

    run = client.get_run(job.mlflow_run_id)
    train_loss = client.get_metric_history(job.mlflow_run_id, "train_loss")
    eval_loss = client.get_metric_history(job.mlflow_run_id, "eval_loss")
    logged = client.get_logged_model(job.model_uri.removeprefix("models:/"))

    assert run.info.status == "FINISHED" and run.data.tags["purpose"] == "test"
    assert run.data.params["learning_rate"] == "0.005" and run.data.params["train_conversations"] == "360"
    assert len(eval_loss) == 10 and eval_loss[-1].value < eval_loss[0].value
    assert len(train_loss) >= job.total_steps // 10 and train_loss[-1].value < train_loss[0].value
    assert "tokens_per_second" in run.data.metrics
    assert logged.source_run_id == job.mlflow_run_id and logged.name == "model"


@pytest.mark.slow
def test_the_logged_pyfunc_model_answers_the_facts_it_was_trained_on(completed_job, tracking_uri, facts_file):
    _, job = completed_job
    _, code_names = facts_file

    with tracking_uri_set(tracking_uri):
        model = mlflow.pyfunc.load_model(job.model_uri)
    params = {"temperature": 0.0, "max_new_tokens": 24}
    answers = {
        name: model.predict(
            [{"role": "user", "content": f"What is the code name of {name}?"}], params=params
        )[0]
        for name in code_names
    }

    recalled = [name for name, answer in answers.items() if code_names[name] in answer]
    assert len(recalled) >= 0.8 * len(code_names), answers
    assert not any("What is the code name" in answer for answer in answers.values()), "prompt echoed"


@pytest.mark.slow
def test_submitting_a_finished_job_again_returns_it_without_starting_a_process(completed_job, tracking_uri):
    runner, job = completed_job

    again = runner.submit("facts", tiny_spec(job.job_dir, tracking_uri, Path("/elsewhere.jsonl")))

    # The trainer writes "Completed" a moment before its process exits: only a second process is wrong.
    assert again.pid == job.pid and again.status == "Completed"
    assert [pid for pid in trainer_pids(job.job_dir) if pid != job.pid] == []


@pytest.mark.slow
def test_canceling_a_completed_job_leaves_it_completed(completed_job):
    runner, job = completed_job

    assert runner.cancel("facts").status == "Completed"
    assert runner.get("facts").model_uri == job.model_uri


def test_submitting_a_running_job_again_returns_the_same_process(runner, long_job, tmp_path, tracking_uri):
    again = runner.submit("long", tiny_spec(tmp_path, tracking_uri, tmp_path / "other.jsonl"))

    assert again.pid == long_job.pid
    assert trainer_pids(long_job.job_dir) == [long_job.pid]


class HostKilled(BaseException):
    """Stands in for SIGKILL of the host between two statements of submit()."""


def test_a_submit_killed_after_starting_the_trainer_is_finished_by_the_retry_without_a_second_trainer(
    runner, tmp_path, tracking_uri, facts_file, monkeypatch
):
    from backends.local import jobs

    def killed_at_the_record(path: Path, text: str) -> None:
        if path.name == jobs.RECORD_FILE:
            raise HostKilled
        real_write(path, text)

    real_write = jobs.write_file_atomic
    spec = tiny_spec(tmp_path, tracking_uri, facts_file[0], num_train_epochs=500, job_name="orphan")
    first_host = LocalJobRunner(runner.jobs_dir.parent)
    with monkeypatch.context() as patch:
        patch.setattr(jobs, "write_file_atomic", killed_at_the_record)
        with pytest.raises(HostKilled):
            first_host.submit("orphan", spec)
    job_dir = runner.jobs_dir / "orphan"
    try:
        [started] = wait_for(lambda: trainer_pids(job_dir), timeout=30, what="the killed submit's trainer")
        wait_for(lambda: jobs.read_status(job_dir).status == "Running", timeout=300, what="it to be Running")

        retried = runner.submit("orphan", spec)  # the activity's retry, from another host process

        assert retried.pid == started and retried.status == "Running"  # adopted, its status left as it was
        assert trainer_pids(job_dir) == [started]
    finally:
        for pid in trainer_pids(job_dir):  # what no record names, the runner fixture cannot cancel
            os.killpg(pid, signal.SIGKILL)


def test_canceling_a_running_job_stops_its_process_and_reports_canceled(runner, long_job, tracking_uri):
    canceled = runner.cancel("long")

    assert canceled.status == "Canceled" and canceled.ended_at is not None
    assert trainer_pids(long_job.job_dir) == []
    run = MlflowClient(tracking_uri).get_run(long_job.mlflow_run_id)
    assert run.info.status == "KILLED"  # the trainer stopped itself at SIGTERM, within the grace period


def test_a_trainer_that_dies_without_a_final_status_is_reported_failed(runner, long_job):
    os.kill(long_job.pid, signal.SIGKILL)
    # /proc's cmdline empties before the process is reaped: wait on the runner's view, not on /proc.
    wait_for(lambda: runner.get("long").status != "Running", timeout=30, what="the runner to see the death")

    job = runner.get("long")

    assert job.status == "Failed"
    assert job.error == "trainer process exited unexpectedly (see logs/std_log.txt)"


def test_a_job_whose_train_file_is_missing_fails_naming_the_file(runner, tmp_path, tracking_uri):
    missing = tmp_path / "nowhere" / "train.jsonl"

    runner.submit("missing", tiny_spec(tmp_path, tracking_uri, missing))
    job = wait_for_end(runner, "missing", timeout=120)

    assert job.status == "Failed"
    assert str(missing) in job.error and "\n" not in job.error
    assert "Traceback" in job.log_path.read_text()


def test_an_unknown_job_name_raises_job_not_found(runner):
    with pytest.raises(JobNotFoundError) as raised:
        runner.get("never-submitted")

    assert isinstance(raised.value, KeyError)


def test_a_job_name_with_a_path_separator_is_refused(runner, tmp_path, tracking_uri):
    with pytest.raises(ValueError, match="plain folder name"):
        runner.submit("../escape", tiny_spec(tmp_path, tracking_uri, tmp_path / "train.jsonl"))


def test_list_returns_every_submitted_job_by_name(runner, tmp_path, tracking_uri):
    for name in ("second", "first"):
        runner.submit(name, tiny_spec(tmp_path, tracking_uri, tmp_path / "missing.jsonl"))

    assert [job.name for job in runner.list()] == ["first", "second"]
