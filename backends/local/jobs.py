"""Local fine-tune jobs: each one a detached `python -m backends.local.trainer <job_dir>` process.

A job lives in `<workspace>/jobs/<name>/`: `spec.json` (what to train), `job.json` (the
submission record: pid and the process's start time, so a recycled pid is never mistaken for
the job), `status.json` (written by the trainer) and `logs/std_log.txt` (its stdout and stderr).
Trainers run in their own session, so they outlive the host that started them; any host can
watch or cancel them through these files. The file contracts (`TrainingSpec`, `JobStatus`) are
defined here, beside the runner, so importing the runner never loads torch.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)

JobState = Literal[
    "NotStarted", "Queued", "Preparing", "Running", "Finalizing", "Completed", "Failed", "Canceled"
]
TERMINAL_STATES = frozenset({"Completed", "Failed", "Canceled"})
SPEC_FILE, STATUS_FILE = "spec.json", "status.json"


class TrainingSpec(BaseModel):
    """Everything one fine-tune job needs; written by the job runner as `<job_dir>/spec.json`."""

    model_config = ConfigDict(extra="forbid")

    job_name: str = Field(min_length=1)
    base_model: str = Field(min_length=1, description="tiny-phi3, smollm2-135m-instruct or a checkpoint dir")
    models_dir: Path
    train_file: Path
    validation_file: Path | None = None
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    num_train_epochs: int = Field(1, ge=1)
    per_device_train_batch_size: int = Field(
        1, ge=1, description="packed rows (or conversations) per micro-batch"
    )
    gradient_accumulation_steps: int = Field(1, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    max_seq_length: int = Field(2048, ge=16, description="tokens per conversation and per packed row")
    packing: bool = True
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    full_finetune: bool = False
    seed: int = 42
    logging_steps: int = Field(10, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: int | None = Field(None, ge=1, description="None: one per CPU core")
    # Throughput switches (backends/local/accelerator.py); "auto" keeps the CPU as it was and picks
    # the fast path on a GPU.
    compile: Literal["auto", "on", "off"] = Field("auto", description="torch.compile the layers; auto: CUDA")
    gradient_checkpointing: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: only when the planned micro-batch would not fit in GPU memory"
    )
    attention: Literal["auto", "sdpa", "eager", "packed_varlen"] = Field(
        "auto", description="auto: packed_varlen (flash-attention varlen) on bf16 GPUs, sdpa elsewhere"
    )
    fused_kernels: Literal["auto", "on", "off"] = Field(
        "auto", description="Liger Triton kernels; auto: on CUDA when liger-kernel is installed"
    )
    max_tokens_per_micro_batch: int | None = Field(
        None, ge=16, description="None: from free GPU memory on CUDA, the spec's rows on CPU"
    )
    throughput_log: Path | None = Field(
        None, description="JSONL file the trainer appends its measured tokens/s to (pipeline/cost.py)"
    )
    mlflow_tracking_uri: str = Field(min_length=1)
    mlflow_experiment: str = "phi3-finetune"
    run_tags: dict[str, str] = Field(default_factory=dict)


class JobStatus(BaseModel):
    """What `<job_dir>/status.json` holds; Azure ML's job state names."""

    status: JobState = "Queued"
    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    tokens_per_second: float | None = None
    mlflow_run_id: str | None = None
    model_uri: str | None = None
    error: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    device: str | None = None


def write_file_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so readers never see a half-written file."""
    staging = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, path)


def read_status(job_dir: Path) -> JobStatus | None:
    path = job_dir / STATUS_FILE
    return JobStatus.model_validate_json(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_status(job_dir: Path, status: JobStatus) -> None:
    write_file_atomic(job_dir / STATUS_FILE, status.model_dump_json(indent=2))


def utc_now() -> datetime:
    return datetime.now(UTC)


PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the directory holding the `backends` package
RECORD_FILE, LOG_FILE = "job.json", Path("logs") / "std_log.txt"
TRAINER_MODULE = "backends.local.trainer"
VANISHED_ERROR = "trainer process exited unexpectedly (see logs/std_log.txt)"
KILL_WAIT_SECONDS = 30.0  # a SIGKILLed trainer not gone by then is left to the kernel


class JobNotFoundError(KeyError):
    """No job of that name in this workspace."""


class JobRecord(BaseModel):
    """The submission record: enough to find the trainer process again from any host process."""

    name: str
    pid: int
    process_start_ticks: int | None
    submitted_at: datetime


class JobInfo(JobStatus):
    """A job as the backend reports it: its JobStatus plus where to find it."""

    name: str
    pid: int | None = None
    log_path: Path
    job_dir: Path


class LocalJobRunner:
    def __init__(self, workspace_dir: Path, *, cancel_grace_seconds: float = 30.0) -> None:
        self.jobs_dir = Path(workspace_dir) / "jobs"
        self.cancel_grace_seconds = cancel_grace_seconds
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    def submit(self, name: str, spec: TrainingSpec) -> JobInfo:
        """Start the job unless a job of that name was already submitted; then return it as is."""
        job_dir = self._job_dir(name)
        job_dir.mkdir(parents=True, exist_ok=True)
        with _exclusive_lock(job_dir / ".submit.lock"):
            if (job_dir / RECORD_FILE).is_file():
                logger.info("job %s was already submitted; not starting it again", name)
                return self.get(name)
            # A submit killed between starting the trainer and writing its record left the trainer
            # running (it has its own session): adopt it rather than start a second one.
            pid = _live_trainer(job_dir) if (job_dir / SPEC_FILE).is_file() else None
            if pid is not None:
                logger.warning("job %s: adopting trainer pid %d, started by an unfinished submit", name, pid)
            else:
                write_file_atomic(job_dir / SPEC_FILE, spec.model_dump_json(indent=2))
                write_status(job_dir, JobStatus(status="Queued"))
                pid = self._spawn(job_dir).pid
                logger.info("job %s started as pid %d", name, pid)
            ticks = _start_ticks(pid)
            record = JobRecord(name=name, pid=pid, process_start_ticks=ticks, submitted_at=utc_now())
            write_file_atomic(job_dir / RECORD_FILE, record.model_dump_json(indent=2))
        return self.get(name)

    def get(self, name: str) -> JobInfo:
        job_dir = self._job_dir(name)
        record = self._record(name)
        status = read_status(job_dir) or JobStatus(status="Queued")
        if status.status not in TERMINAL_STATES and not self._is_running(record):
            # Re-read: the trainer may have written its final status just before exiting.
            status = read_status(job_dir) or status
            if status.status not in TERMINAL_STATES:
                status = self._mark(job_dir, status, "Failed", error=VANISHED_ERROR)
        return JobInfo(
            **status.model_dump(), name=name, pid=record.pid, log_path=job_dir / LOG_FILE, job_dir=job_dir
        )

    def cancel(self, name: str) -> JobInfo:
        """SIGTERM the trainer, SIGKILL it after the grace period; a finished job is left as it is."""
        record = self._record(name)
        if self.get(name).status in TERMINAL_STATES:
            return self.get(name)
        self._signal(record, signal.SIGTERM)
        deadline = time.monotonic() + self.cancel_grace_seconds
        while self._is_running(record) and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._is_running(record):
            logger.warning("job %s ignored SIGTERM for %.0f s: killing it", name, self.cancel_grace_seconds)
            self._signal(record, signal.SIGKILL)
            killed_by = time.monotonic() + KILL_WAIT_SECONDS
            while self._is_running(record) and time.monotonic() < killed_by:
                time.sleep(0.05)
            if self._is_running(record):  # stuck in the kernel (uninterruptible I/O): it can do no more work
                logger.warning("job %s is still there %.0f s after SIGKILL", name, KILL_WAIT_SECONDS)
        job_dir = self._job_dir(name)
        status = read_status(job_dir) or JobStatus()
        if status.status not in TERMINAL_STATES:
            self._mark(job_dir, status, "Canceled")
        return self.get(name)

    def list(self) -> list[JobInfo]:
        if not self.jobs_dir.is_dir():
            return []
        names = sorted(path.parent.name for path in self.jobs_dir.glob(f"*/{RECORD_FILE}"))
        return [self.get(name) for name in names]

    def _job_dir(self, name: str) -> Path:
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise ValueError(f"job name {name!r} must be a plain folder name (no path separators)")
        return self.jobs_dir / name

    def _record(self, name: str) -> JobRecord:
        path = self._job_dir(name) / RECORD_FILE
        if not path.is_file():
            raise JobNotFoundError(f"no local job named {name!r} in {self.jobs_dir}")
        return JobRecord.model_validate_json(path.read_text(encoding="utf-8"))

    def _spawn(self, job_dir: Path) -> subprocess.Popen[bytes]:
        (job_dir / LOG_FILE).parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        with open(job_dir / LOG_FILE, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", TRAINER_MODULE, str(job_dir)],
                cwd=PROJECT_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives the host; signals to the host's group don't reach it
            )
        self._children[process.pid] = process
        return process

    def _is_running(self, record: JobRecord) -> bool:
        child = self._children.get(record.pid)
        if child is not None and child.poll() is not None:  # reaps our own zombie
            del self._children[record.pid]
            return False
        if record.process_start_ticks is None:  # no /proc (macOS): the pid alone has to do
            return _pid_exists(record.pid)
        ticks = _start_ticks(record.pid)
        if ticks != record.process_start_ticks:
            return False
        if _is_zombie(record.pid):
            if child is not None:  # it exited between poll() and here: reap it now
                child.wait()
                self._children.pop(record.pid, None)
            return False
        return True

    def _signal(self, record: JobRecord, signum: signal.Signals) -> None:
        if self._is_running(record):
            try:
                os.killpg(record.pid, signum)  # the trainer leads its own session and process group
            except ProcessLookupError:
                pass  # it exited between the check and the signal: nothing left to stop

    @staticmethod
    def _mark(job_dir: Path, status: JobStatus, state: JobState, error: str | None = None) -> JobStatus:
        changes = {"status": state, "error": error or status.error, "ended_at": utc_now()}
        updated = status.model_copy(update=changes)
        write_status(job_dir, updated)
        return updated


def _proc_stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (which may itself hold spaces and parentheses)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat[stat.rindex(")") + 2 :].split()


def _start_ticks(pid: int) -> int | None:
    fields = _proc_stat_fields(pid)
    return int(fields[19]) if fields else None  # field 22 of stat: start time in clock ticks since boot


def _is_zombie(pid: int) -> bool:
    fields = _proc_stat_fields(pid)
    return fields is not None and fields[0] in ("Z", "X")


def _live_trainer(job_dir: Path) -> int | None:
    """The pid of a live trainer process working in `job_dir` (found by its command line), if any."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None  # no /proc (macOS): nothing to adopt, so a retry there may start a second trainer
    wanted = [TRAINER_MODULE.encode(), str(job_dir).encode()]
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # exited while we looked, or not ours to read
        if argv[-2:] == wanted and not _is_zombie(int(entry.name)):
            return int(entry.name)
    return None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Serialise submits of one job across processes: a second submit waits, then sees the record."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
