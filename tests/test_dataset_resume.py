"""The dataset step goes on where it stopped: a Functions activity must end within host.json's
functionTimeout, and scanning a big source (all of ultrachat_200k's train_sft) takes longer. Given a
deadline, the scan saves its progress after every chunk of rows and hands back once past it; the next
call (after the orchestrator's durable timer) resumes from the saved row. Whether in one call or many,
and across a worker killed mid-chunk or mid-save, the same input gives the same bytes and report.

The clock is a counter that the scan reads once as it starts and once a row, so a chunk is
``CHECKPOINT_SECONDS`` rows and where a call stops does not depend on this machine's speed.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import pipeline.dataset_scan as dataset_scan
from activities.steps import StepInput, prepare_dataset_step, upload_data
from backends.local.backend import LocalBackend
from pipeline.chat_dataset import (
    PROBLEMS_FILE,
    SCAN_DIR,
    TEST_FILE,
    TRAIN_FILE,
    DatasetReport,
    DatasetSource,
    HubDataset,
    InvalidDatasetError,
    LocalFiles,
    ScanProgress,
    load_rows,
    prepare_dataset,
)
from pipeline.chat_validation import APPROX_TOKENIZER, approx_token_count
from pipeline.config import RunConfig
from settings import get_settings
from tests.test_chat_dataset import chat, write_jsonl

CHECKPOINT_ROWS = dataset_scan.CHECKPOINT_ROWS
CHUNK = int(dataset_scan.CHECKPOINT_SECONDS)  # rows a chunk holds under the counting clock
NEVER = float("inf")
ALWAYS = -1.0  # a deadline already past: every call scans one chunk and hands back
ROWS = [chat(f"question {i}?", f"answer {i}. " * (i % 7 + 1)) for i in range(23)]
BAD = {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}
WITH_BAD_ROWS = [*ROWS[:2], BAD, *ROWS[2:15], {"messages": []}, *ROWS[15:]]


@pytest.fixture(autouse=True)
def clock(monkeypatch):
    """The scan's monotonic() as 0, 1, 2, ... from each ``clock()`` on."""

    def restart() -> None:
        ticks = itertools.count()
        monkeypatch.setattr(dataset_scan, "monotonic", lambda: float(next(ticks)))

    restart()
    return restart


def in_calls(
    source: DatasetSource, out: Path, until: float, **options: Any
) -> tuple[DatasetReport, list[str]]:
    """Call prepare_dataset until it is done; its report and what each call that handed back said."""
    said: list[str] = []
    while isinstance(
        result := prepare_dataset(load_rows(source), out_dir=out, until=until, **options), ScanProgress
    ):
        said.append(str(result))
        assert len(said) <= 100, said
    return result, said


def outputs(out: Path) -> dict[str, bytes]:
    return {
        name: (out / name).read_bytes()
        for name in (TRAIN_FILE, TEST_FILE, PROBLEMS_FILE)
        if (out / name).exists()
    }


def files(tmp_path: Path, rows: list[Any]) -> LocalFiles:
    return LocalFiles(paths=[write_jsonl(tmp_path / "chats.jsonl", rows)])


def test_a_call_past_its_deadline_hands_back_and_the_next_goes_on_to_the_same_bytes(tmp_path: Path) -> None:
    source = files(tmp_path, ROWS)

    first = prepare_dataset(load_rows(source), out_dir=tmp_path / "out", until=CHUNK + 1)

    # The first save comes before the deadline, the second after it: two chunks in this call.
    assert isinstance(first, ScanProgress) and first.rows_scanned == 2 * CHUNK
    assert str(first) == f"scanned {2 * CHUNK} rows of the source"
    assert not (tmp_path / "out" / TRAIN_FILE).exists()
    second = prepare_dataset(load_rows(source), out_dir=tmp_path / "out", until=NEVER)
    assert isinstance(second, DatasetReport) and second.rows_read == len(ROWS)
    in_parts = outputs(tmp_path / "out")
    assert not (tmp_path / "out" / SCAN_DIR).exists()  # the saved scan is gone once the split is written

    assert prepare_dataset(load_rows(source), out_dir=tmp_path / "out") == second
    assert outputs(tmp_path / "out") == in_parts


def test_every_call_scans_at_least_one_chunk_however_small_the_budget(tmp_path: Path) -> None:
    source = files(tmp_path, ROWS)

    report, said = in_calls(source, tmp_path / "out", until=ALWAYS)

    assert said == [f"scanned {n} rows of the source" for n in range(CHUNK, len(ROWS), CHUNK)]
    assert report == prepare_dataset(load_rows(source), out_dir=tmp_path / "out")


def test_a_big_source_is_saved_every_few_thousand_rows_however_fast_it_is_read(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(dataset_scan, "monotonic", lambda: 0.0)  # no time passes
    rows = [chat(f"q{i}?", "a.") for i in range(2 * CHECKPOINT_ROWS + 3)]

    report, said = in_calls(files(tmp_path, rows), tmp_path / "out", until=ALWAYS)

    assert said == [f"scanned {n:,} rows of the source" for n in (CHECKPOINT_ROWS, 2 * CHECKPOINT_ROWS)]
    assert report.rows_read == len(rows)


def test_a_worker_killed_mid_chunk_resumes_from_the_last_save_and_counts_each_row_once(
    tmp_path: Path,
) -> None:
    source = files(tmp_path, ROWS)
    killed_at = 2 * CHUNK + 2  # two chunks saved, then two rows of the third read

    class WorkerDied(BaseException):
        pass

    seen: Counter[str] = Counter()

    def count_tokens(text: str) -> int:
        if text == f"question {killed_at}?" and not seen[text]:
            seen[text] += 1
            raise WorkerDied
        seen[text] += 1
        return approx_token_count(text)

    options = {"count_tokens": count_tokens, "tokenizer_name": APPROX_TOKENIZER}
    with pytest.raises(WorkerDied):
        prepare_dataset(load_rows(source), out_dir=tmp_path / "out", until=NEVER, **options)
    resumed = prepare_dataset(load_rows(source), out_dir=tmp_path / "out", until=NEVER, **options)

    assert resumed == prepare_dataset(load_rows(source), out_dir=tmp_path / "out")
    assert seen["question 1?"] == 1 and seen[f"question {2 * CHUNK - 1}?"] == 1  # saved: not read again
    assert seen[f"question {2 * CHUNK}?"] == 2 and seen[f"question {killed_at}?"] == 2  # read again
    assert seen[f"question {len(ROWS) - 1}?"] == 1


def test_a_save_cut_short_by_a_killed_worker_is_cut_back_and_nothing_is_counted_twice(tmp_path: Path) -> None:
    source = files(tmp_path, WITH_BAD_ROWS)
    out = tmp_path / "out"
    prepare_dataset(load_rows(source), out_dir=out, until=ALWAYS, drop_invalid=True)
    # A second save was killed after appending rows and problems, before its state.json replaced the first's.
    with (out / SCAN_DIR / "rows.jsonl").open("a") as rows:
        rows.write(json.dumps({"messages": ROWS[7]["messages"]}) + "\n" + '{"messages": [{"ro')
    with (out / SCAN_DIR / "problems.jsonl").open("a") as problems:
        problems.write('{"source": "chats.jsonl", "line": 99, "reason": "too_lo')
    (out / SCAN_DIR / "state.json.partial").write_text('{"version": 1, "finger')

    resumed, _ = in_calls(source, out, until=NEVER, drop_invalid=True)
    in_parts = outputs(out)

    assert resumed == prepare_dataset(load_rows(source), out_dir=out, drop_invalid=True)
    assert outputs(out) == in_parts
    assert resumed.rows_read == len(WITH_BAD_ROWS) and resumed.rows_dropped == 2


def test_invalid_rows_found_in_an_early_call_fail_the_last_call_as_they_fail_one_call(tmp_path: Path) -> None:
    source = files(tmp_path, WITH_BAD_ROWS)

    with pytest.raises(InvalidDatasetError) as in_parts:
        in_calls(source, tmp_path / "out", until=ALWAYS)
    problems = (tmp_path / "out" / PROBLEMS_FILE).read_bytes()
    with pytest.raises(InvalidDatasetError) as in_one:
        prepare_dataset(load_rows(source), out_dir=tmp_path / "out")

    assert str(in_parts.value) == str(in_one.value) and in_parts.value.report == in_one.value.report
    assert [p.line for p in in_parts.value.report.first_problems] == [3, 17]
    assert (tmp_path / "out" / PROBLEMS_FILE).read_bytes() == problems


def test_invalid_rows_found_in_an_early_call_are_dropped_as_in_one_call(tmp_path: Path) -> None:
    source = files(tmp_path, WITH_BAD_ROWS)

    report, said = in_calls(source, tmp_path / "out", until=ALWAYS, drop_invalid=True)
    in_parts = outputs(tmp_path / "out")

    assert said[0] == f"scanned {CHUNK} rows of the source (1 invalid so far)"
    assert report == prepare_dataset(load_rows(source), out_dir=tmp_path / "out", drop_invalid=True)
    assert outputs(tmp_path / "out") == in_parts and report.rows_dropped == 2


def test_a_saved_scan_of_a_source_that_has_changed_since_is_not_resumed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare_dataset(load_rows(files(tmp_path, ROWS[5:])), out_dir=out, until=ALWAYS)

    changed = files(tmp_path, ROWS)  # rewritten meanwhile: other rows, another size
    report, _ = in_calls(changed, out, until=ALWAYS)

    assert report == prepare_dataset(load_rows(changed), out_dir=out)
    assert report.rows_read == len(ROWS)


def several_files(tmp_path: Path) -> LocalFiles:
    first = write_jsonl(tmp_path / "a.jsonl", WITH_BAD_ROWS[:8])
    with (tmp_path / "b.jsonl").open("w") as second:  # blank lines keep their physical numbers
        second.write("\n".join(["", *(json.dumps(row) for row in WITH_BAD_ROWS[8:])]) + "\n")
    return LocalFiles(paths=[first, tmp_path / "b.jsonl"])


def parquet(tmp_path: Path) -> LocalFiles:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "parquet").mkdir()
    for part, rows in (("a", WITH_BAD_ROWS[:11]), ("b", WITH_BAD_ROWS[11:])):
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "parquet" / f"{part}.parquet", row_group_size=4)
    return LocalFiles(paths=[tmp_path / "parquet"])


def saved_dataset(tmp_path: Path) -> LocalFiles:
    import datasets

    datasets.Dataset.from_list(WITH_BAD_ROWS).save_to_disk(str(tmp_path / "saved"))
    return LocalFiles(paths=[tmp_path / "saved"])


def hub_shards(tmp_path: Path, split: str = "train") -> HubDataset:
    """A dataset repository laid out as on the hub, its split in three files (three shards of the stream)."""
    folder = tmp_path / "repo"
    (folder / "data").mkdir(parents=True)
    for shard, start in enumerate(range(0, len(WITH_BAD_ROWS), 9)):
        write_jsonl(folder / "data" / f"train-{shard:05d}-of-00003.jsonl", WITH_BAD_ROWS[start : start + 9])
    card = "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n"
    (folder / "README.md").write_text(card + "---\n", encoding="utf-8")
    return HubDataset(id=str(folder), split=split)


@pytest.mark.parametrize(
    "source",
    [
        pytest.param(several_files, id="jsonl_files"),
        pytest.param(parquet, id="parquet"),
        pytest.param(saved_dataset, id="saved_dataset"),
        pytest.param(hub_shards, id="hub_stream"),
        pytest.param(lambda tmp_path: hub_shards(tmp_path, "train[3:21]"), id="hub_stream_slice"),
    ],
)
def test_each_kind_of_source_resumes_at_the_saved_row_with_the_same_origins(tmp_path: Path, source) -> None:
    chosen = source(tmp_path)

    report, said = in_calls(chosen, tmp_path / "out", until=ALWAYS, drop_invalid=True)
    in_parts = outputs(tmp_path / "out")

    assert len(said) >= 2
    assert report == prepare_dataset(load_rows(chosen), out_dir=tmp_path / "out", drop_invalid=True)
    assert outputs(tmp_path / "out") == in_parts


# The step -----------------------------------------------------------------------------------------


@pytest.fixture
def app_settings(tmp_path, monkeypatch):
    """The settings a step reads: the state under tmp_path, and what a test sets (e.g. the budget)."""

    def use(**values: object) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, str(value))
        get_settings.cache_clear()

    use(PHI3_STATE_DIR=tmp_path / "phi3", DATASET_CALL_BUDGET_S=420)
    yield use
    get_settings.cache_clear()


def dataset_step(tmp_path: Path, rows: list[Any]):
    config = RunConfig.model_validate(
        {
            "model": {"name": "tiny-phi3"},
            "dataset": {"hub_id": None, "files": [str(write_jsonl(tmp_path / "c.jsonl", rows))]},
        }
    )
    backend = LocalBackend(get_settings(), restart_endpoints=False)

    def call(step, run_id: str, state: dict[str, Any] | None = None):
        return step(StepInput(run_id=run_id, config=config, names={}, state=state or {}), backend)

    return call


def without_paths(dataset: dict[str, Any]) -> dict[str, Any]:
    return {
        key: {k: v for k, v in value.items() if k != "path"} if key.endswith("_file") else value
        for key, value in dataset.items()
    }


def test_the_dataset_step_hands_back_with_its_progress_and_ends_as_one_call_would(
    tmp_path, app_settings, clock
):
    call = dataset_step(tmp_path, ROWS)
    app_settings(DATASET_CALL_BUDGET_S=1)

    handed_back = []
    while (result := call(prepare_dataset_step, "in-parts")).pending:
        handed_back.append(result.pending)
    app_settings(DATASET_CALL_BUDGET_S=420)
    clock()
    whole = call(prepare_dataset_step, "whole")

    assert handed_back == [f"scanned {n} rows of the source" for n in range(CHUNK, len(ROWS), CHUNK)]
    assert result.ok and not whole.pending and result.summary == whole.summary
    assert without_paths(result.outputs["dataset"]) == without_paths(whole.outputs["dataset"])


def test_upload_data_on_a_host_without_the_prepared_files_prepares_them_again_in_parts(
    tmp_path, app_settings
):
    call = dataset_step(tmp_path, ROWS)
    prepared = call(prepare_dataset_step, "r").outputs
    for name in ("train_file", "test_file"):
        Path(prepared["dataset"][name]["path"]).unlink()  # prepared by another host instance
    app_settings(DATASET_CALL_BUDGET_S=1)

    handed_back = []
    while (result := call(upload_data, "r", prepared)).pending:
        handed_back.append(result.pending)

    assert handed_back[0] == f"preparing the dataset again on this host: scanned {CHUNK} rows of the source"
    assert result.outputs["data"]["train"]["sha256"] == prepared["dataset"]["train_file"]["sha256"]


def test_evaluate_on_a_host_without_the_prepared_files_prepares_them_again_first(tmp_path, app_settings):
    # A Function App's working files are the instance's own: the evaluate step may land on an instance
    # that never saw the test split, and must not fail for it.
    from activities.evaluate import evaluate

    call = dataset_step(tmp_path, ROWS)
    prepared = call(prepare_dataset_step, "r").outputs
    test_file = Path(prepared["dataset"]["test_file"]["path"])
    test_file.unlink()  # prepared by another host instance
    app_settings(DATASET_CALL_BUDGET_S=1)

    result = call(evaluate, "r", prepared)

    assert result.pending == f"preparing the dataset again on this host: scanned {CHUNK} rows of the source"
    while call(prepare_dataset_step, "r").pending:  # (the rest of the scan, as the next calls would)
        pass
    assert test_file.is_file()


def test_the_smoke_tests_ask_the_test_splits_first_question_on_a_host_without_the_prepared_files(tmp_path):
    from activities.steps import first_question

    call = dataset_step(tmp_path, ROWS)
    prepared = call(prepare_dataset_step, "r").outputs
    test_file = Path(prepared["dataset"]["test_file"]["path"])
    asked_here = json.loads(test_file.read_text(encoding="utf-8").splitlines()[0])["messages"][0]["content"]
    test_file.unlink()  # prepared by another host instance

    question = call(lambda inp, backend: first_question(inp), "r", prepared)

    assert question == asked_here and question.startswith("question ")


NAMES = {"names": {"endpoint": "e", "deployment": "d"}}


def test_evaluations_budget_counts_from_the_calls_start_so_preparing_again_is_part_of_it(
    tmp_path, app_settings, monkeypatch
):
    # One call must end within functionTimeout: preparing the dataset again on this host (up to
    # DATASET_CALL_BUDGET_S) leaves the evaluation only what remains of its budget, and the call hands
    # back after the one question every call asks.
    import activities.evaluate as evaluate_module
    import pipeline.evaluation

    call = dataset_step(tmp_path, ROWS)
    prepared = call(prepare_dataset_step, "r").outputs
    Path(prepared["dataset"]["test_file"]["path"]).unlink()  # prepared by another host instance
    now = [0.0]
    monkeypatch.setattr(pipeline.evaluation, "monotonic", lambda: now[0])
    real_prepared_here = evaluate_module.prepared_here

    def preparing_takes_400_s(inp, backend):
        files = real_prepared_here(inp, backend)
        now[0] += 400  # more than EVALUATION_CALL_BUDGET_S (360)
        return files

    asked = []

    class Flow:  # the deployed flow (tests/test_pipeline_e2e.py runs the real one end to end)
        @staticmethod
        def answer_conversation(messages):
            asked.append(messages[-1]["content"])
            return "an answer"

    monkeypatch.setattr(evaluate_module, "prepared_here", preparing_takes_400_s)
    monkeypatch.setattr(evaluate_module, "flow_runner", lambda backend, inp, deployment: Flow())

    def evaluate(inp, backend):
        return evaluate_module.evaluate(inp.model_copy(update=NAMES), backend)

    result = call(evaluate, "r", prepared)

    assert result.pending and len(asked) == 1
