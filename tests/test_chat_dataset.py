"""The dataset step: reading sources, validating rows with line numbers, splitting, writing JSONL."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from pipeline.chat_dataset import (
    PROBLEMS_FILE,
    DatasetError,
    DatasetReport,
    DatasetSourceError,
    DatasetTooSmallError,
    HubDataset,
    InvalidDatasetError,
    LocalFiles,
    load_rows,
    prepare_dataset,
    resolve_split_slice,
    tokenizer_counter,
)
from pipeline.chat_validation import (
    APPROX_TOKENIZER,
    MESSAGE_OVERHEAD_TOKENS,
    ProblemReason,
    validate_row,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def chat(question: str, answer: str, **extra: Any) -> dict[str, Any]:
    return {
        **extra,
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
    }


GOOD = [chat(f"question {i}?", f"answer {i}.") for i in range(10)]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Rows are JSON values, or bytes written verbatim as one line (for broken lines)."""
    with path.open("wb") as file:
        for row in rows:
            line = row if isinstance(row, bytes) else json.dumps(row, ensure_ascii=False).encode("utf-8")
            file.write(line + b"\n")
    return path


def prepare(path: Path | LocalFiles, out_dir: Path, **options: Any) -> DatasetReport:
    return prepare_dataset(load_rows(path), out_dir=out_dir, **options)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def user(content: str = "hi") -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str = "hello") -> dict[str, str]:
    return {"role": "assistant", "content": content}


def system(content: str = "be brief") -> dict[str, str]:
    return {"role": "system", "content": content}


BAD_ROWS = [
    pytest.param(b"[1, 2]", ProblemReason.NOT_AN_OBJECT, "", id="not_an_object"),
    pytest.param({"prompt": "hi"}, ProblemReason.MISSING_MESSAGES, "messages", id="missing_messages"),
    pytest.param({"messages": "hi"}, ProblemReason.MESSAGES_NOT_A_LIST, "messages", id="messages_not_a_list"),
    pytest.param({"messages": []}, ProblemReason.EMPTY_MESSAGES, "messages", id="empty_messages"),
    pytest.param(
        {"messages": ["hi", assistant()]},
        ProblemReason.MESSAGE_NOT_AN_OBJECT,
        "messages[0]",
        id="message_not_an_object",
    ),
    pytest.param(
        {"messages": [{"role": "user"}, assistant()]},
        ProblemReason.MESSAGE_MISSING_KEY,
        "messages[0].content",
        id="message_missing_key",
    ),
    pytest.param(
        {"messages": [user(), {**assistant(), "name": "bob"}]},
        ProblemReason.MESSAGE_UNRECOGNIZED_KEY,
        "messages[1].name",
        id="message_unrecognized_key",
    ),
    pytest.param(
        {"messages": [user(), {"role": "bot", "content": "hello"}]},
        ProblemReason.UNRECOGNIZED_ROLE,
        "messages[1].role",
        id="unrecognized_role",
    ),
    pytest.param(
        {"messages": [user(), {"role": "assistant", "content": 42}]},
        ProblemReason.CONTENT_NOT_A_STRING,
        "messages[1].content",
        id="content_not_a_string",
    ),
    pytest.param(
        {"messages": [user(), assistant("  \n")]},
        ProblemReason.EMPTY_CONTENT,
        "messages[1].content",
        id="empty_content",
    ),
    pytest.param(
        {"messages": [user(), user(), assistant()]},
        ProblemReason.ROLES_NOT_ALTERNATING,
        "messages[1].role",
        id="roles_not_alternating",
    ),
    pytest.param(
        {"messages": [user(), assistant(), system(), user(), assistant()]},
        ProblemReason.ROLES_NOT_ALTERNATING,
        "messages[2].role",
        id="system_message_not_first",
    ),
    pytest.param(
        {"messages": [system(), assistant()]},
        ProblemReason.MISSING_USER_MESSAGE,
        "messages",
        id="missing_user_message",
    ),
    pytest.param(
        {"messages": [user(), assistant(), user()]},
        ProblemReason.DOES_NOT_END_WITH_ASSISTANT,
        "messages[2].role",
        id="does_not_end_with_assistant",
    ),
    pytest.param(chat("hi", "word " * 200), ProblemReason.TOO_LONG, "messages", id="too_long"),
    pytest.param(b'{"messages": [', ProblemReason.INVALID_JSON, "", id="invalid_json"),
    pytest.param(b'{"messages": "caf\xe9"}', ProblemReason.INVALID_ENCODING, "", id="invalid_encoding"),
    # Half of an emoji's UTF-16 pair, escaped or as (CESU-8) bytes: JSON lets it in, UTF-8 cannot hold it.
    pytest.param(
        b'{"messages": [{"role": "user", "content": "hi \\ud83d"}]}',
        ProblemReason.INVALID_ENCODING,
        "",
        id="lone_surrogate_escaped",
    ),
    pytest.param(
        b'{"messages": [{"role": "user", "content": "hi \xed\xa0\xbd"}]}',
        ProblemReason.INVALID_ENCODING,
        "",
        id="lone_surrogate_bytes",
    ),
    pytest.param(b"[" * 100_000 + b"]" * 100_000, ProblemReason.INVALID_JSON, "", id="nested_too_deeply"),
    pytest.param(
        b'{"messages": [], "n": ' + b"9" * 5000 + b"}", ProblemReason.INVALID_JSON, "", id="huge_number"
    ),
]


@pytest.mark.parametrize(("bad_row", "reason", "field"), BAD_ROWS)
def test_a_bad_row_is_reported_with_its_line_number_reason_and_field(
    tmp_path: Path, bad_row: Any, reason: ProblemReason, field: str
) -> None:
    path = write_jsonl(tmp_path / "chats.jsonl", [GOOD[0], GOOD[1], bad_row, GOOD[2]])

    with pytest.raises(InvalidDatasetError) as raised:
        prepare(path, tmp_path / "out", max_tokens=256)

    problems = raised.value.report.first_problems
    assert [(p.source, p.line, p.reason, p.field) for p in problems] == [("chats.jsonl", 3, reason, field)]
    assert f"chats.jsonl line 3: {problems[0].message}" in str(raised.value)


def test_a_surrogate_pair_is_one_character_and_not_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "chats.jsonl"
    emoji = (
        b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00?"}, '
        b'{"role": "assistant", "content": "Ok"}]}'
    )
    path.write_bytes(b"\n".join([emoji, *(json.dumps(row).encode() for row in GOOD)]) + b"\n")

    report = prepare(path, tmp_path / "out", max_tokens=256)

    assert (report.rows_valid, report.rows_invalid) == (len(GOOD) + 1, 0)


def test_an_unrecognized_role_message_names_the_field_and_the_allowed_roles() -> None:
    problems = validate_row({"messages": [user(), {"role": "bot", "content": "x"}]})

    assert [p.message for p in problems] == ["messages[1].role: 'bot' is not one of system, user, assistant"]


def test_a_message_missing_both_keys_and_carrying_an_extra_one_gets_one_problem_per_key() -> None:
    problems = validate_row({"messages": [{"text": "hi"}, assistant()]})

    assert [(p.reason, p.field) for p in problems] == [
        (ProblemReason.MESSAGE_MISSING_KEY, "messages[0].role"),
        (ProblemReason.MESSAGE_MISSING_KEY, "messages[0].content"),
        (ProblemReason.MESSAGE_UNRECOGNIZED_KEY, "messages[0].text"),
    ]


def test_a_well_formed_conversation_with_a_system_message_and_two_turns_has_no_problems() -> None:
    row = {
        "prompt": "hi",
        "prompt_id": "0" * 64,
        "messages": [system(), user(), assistant(), user(), assistant()],
    }

    assert validate_row(row) == []


def test_a_conversation_exactly_at_max_tokens_is_accepted_and_one_token_over_is_not() -> None:
    row = chat("abcd", "efgh")  # 1 + 1 content tokens, plus the per-message overhead
    length = 2 + 2 * MESSAGE_OVERHEAD_TOKENS

    assert validate_row(row, max_tokens=length) == []
    assert [p.reason for p in validate_row(row, max_tokens=length - 1)] == [ProblemReason.TOO_LONG]


def test_blank_lines_are_skipped_and_later_line_numbers_stay_physical(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chats.jsonl", [GOOD[0], b"", b"   ", GOOD[1], b'{"messages": []}'])

    with pytest.raises(InvalidDatasetError) as raised:
        prepare(path, tmp_path / "out")

    report = raised.value.report
    assert report.rows_read == 3
    assert [(p.line, p.row) for p in report.first_problems] == [(5, 2)]


def test_mixed_rows_with_drop_invalid_keep_the_good_ones_and_count_the_rest(tmp_path: Path) -> None:
    rows = [*GOOD[:5], b"not json", {"messages": []}, *GOOD[5:], chat("q", "")]
    path = write_jsonl(tmp_path / "chats.jsonl", rows)

    report = prepare(path, tmp_path / "out", drop_invalid=True)

    assert (report.rows_read, report.rows_valid, report.rows_invalid, report.rows_dropped) == (13, 10, 3, 3)
    assert (report.train_rows, report.test_rows) == (8, 2)
    assert report.problem_counts == {"empty_content": 1, "empty_messages": 1, "invalid_json": 1}
    assert [p.line for p in report.first_problems] == [6, 7, 13]


def test_mixed_rows_without_drop_invalid_fail_listing_the_bad_lines_and_the_setting(tmp_path: Path) -> None:
    rows = [*GOOD[:5], b"not json", {"messages": []}, *GOOD[5:]]
    path = write_jsonl(tmp_path / "chats.jsonl", rows)

    with pytest.raises(InvalidDatasetError) as raised:
        prepare(path, tmp_path / "out")

    message = str(raised.value)
    assert message.startswith("2 of 12 rows are invalid; first problems: chats.jsonl line 6: not valid JSON")
    assert "chats.jsonl line 7: messages: the list is empty" in message
    assert message.endswith("set dataset.drop_invalid_rows=true to drop them")
    assert not (tmp_path / "out" / "train.jsonl").exists()


def test_the_report_lists_fifty_problems_and_the_problems_file_holds_them_all(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chats.jsonl", [*GOOD, *([{"messages": []}] * 70)])

    report = prepare(path, tmp_path / "out", drop_invalid=True)

    assert len(report.first_problems) == 50
    assert report.problems_file == str(tmp_path / "out" / PROBLEMS_FILE)
    listed = json.loads(Path(report.problems_file).read_text(encoding="utf-8"))
    assert [p["line"] for p in listed] == list(range(11, 81))


def test_a_clean_rerun_removes_the_problems_file_of_an_earlier_run(tmp_path: Path) -> None:
    prepare(write_jsonl(tmp_path / "bad.jsonl", [*GOOD, b"{"]), tmp_path / "out", drop_invalid=True)

    report = prepare(write_jsonl(tmp_path / "good.jsonl", GOOD), tmp_path / "out")

    assert report.problems_file is None
    assert not (tmp_path / "out" / PROBLEMS_FILE).exists()


def test_the_invalid_dataset_error_survives_pickling_with_its_report(tmp_path: Path) -> None:
    with pytest.raises(InvalidDatasetError) as raised:
        prepare(write_jsonl(tmp_path / "chats.jsonl", [*GOOD, b"{"]), tmp_path / "out")

    copy = pickle.loads(pickle.dumps(raised.value))

    assert str(copy) == str(raised.value)
    assert copy.report == raised.value.report


@pytest.mark.parametrize(("rows", "test_rows"), [(10, 2), (7, 2), (5, 1), (2, 1)])
def test_the_test_split_gets_the_ceiling_of_test_size_times_the_rows(
    tmp_path: Path, rows: int, test_rows: int
) -> None:
    report = prepare(write_jsonl(tmp_path / "chats.jsonl", GOOD[:rows]), tmp_path / "out")

    assert (report.train_rows, report.test_rows) == (rows - test_rows, test_rows)
    assert len(read_jsonl(report.train_file.path)) == rows - test_rows
    assert len(read_jsonl(report.test_file.path)) == test_rows


def test_the_split_picks_the_same_rows_as_datasets_train_test_split_with_the_same_seed(
    tmp_path: Path,
) -> None:
    import datasets

    rows = [chat(f"question {i}?", f"answer {i}.") for i in range(57)]
    expected = datasets.Dataset.from_list(rows).train_test_split(test_size=0.2, seed=7)

    report = prepare(write_jsonl(tmp_path / "chats.jsonl", rows), tmp_path / "out", seed=7)

    assert read_jsonl(report.test_file.path) == list(expected["test"])
    assert read_jsonl(report.train_file.path) == list(expected["train"])


def test_the_same_input_and_seed_give_byte_identical_files(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chats.jsonl", GOOD)

    first = prepare(path, tmp_path / "first")
    second = prepare(path, tmp_path / "second")

    assert first.train_file.sha256 == second.train_file.sha256
    assert first.test_file.sha256 == second.test_file.sha256
    for report in (first, second):
        data = Path(report.train_file.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == report.train_file.sha256


def test_a_different_seed_gives_a_different_order_of_the_same_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chats.jsonl", GOOD)

    first = prepare(path, tmp_path / "first", seed=1)
    second = prepare(path, tmp_path / "second", seed=2)

    def rows(report: DatasetReport) -> list[dict[str, Any]]:
        return read_jsonl(report.train_file.path) + read_jsonl(report.test_file.path)

    assert rows(first) != rows(second)
    assert sorted(map(json.dumps, rows(first))) == sorted(map(json.dumps, rows(second)))


def test_outputs_hold_only_the_messages_of_each_row_in_unescaped_utf8(tmp_path: Path) -> None:
    rows = [chat(f"Où est le café n°{i} ? 日本", "Ici.", prompt="p", prompt_id="x" * 64) for i in range(5)]

    report = prepare(write_jsonl(tmp_path / "chats.jsonl", rows), tmp_path / "out")

    written = read_jsonl(report.train_file.path) + read_jsonl(report.test_file.path)
    assert {tuple(row) for row in written} == {("messages",)}
    assert (
        "café n°0 ? 日本".encode()
        in Path(report.train_file.path).read_bytes() + Path(report.test_file.path).read_bytes()
    )


def test_one_valid_row_is_too_few_to_give_both_splits_a_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chats.jsonl", [GOOD[0], b"{"])

    with pytest.raises(DatasetTooSmallError, match=r"1 valid rows after dropping 1 invalid rows .*test_size"):
        prepare(path, tmp_path / "out", drop_invalid=True)


def test_a_test_size_outside_zero_to_one_is_rejected_naming_the_setting(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"dataset.test_size must be between 0 and 1.*got 1.5"):
        prepare(write_jsonl(tmp_path / "chats.jsonl", GOOD), tmp_path / "out", test_size=1.5)


def test_an_empty_file_is_an_error_not_an_empty_split(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")

    with pytest.raises(DatasetError, match="has no rows"):
        prepare(tmp_path / "empty.jsonl", tmp_path / "out")


def test_a_missing_file_is_named_in_the_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetSourceError, match=r"nowhere\.jsonl does not exist"):
        list(load_rows(tmp_path / "nowhere.jsonl"))


def test_an_unsupported_file_type_is_rejected_listing_the_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "chats.csv").write_text("a,b\n", encoding="utf-8")

    with pytest.raises(DatasetSourceError, match=r"suffix '\.csv'; supported: \.jsonl"):
        list(load_rows(tmp_path / "chats.csv"))


def test_several_jsonl_files_are_read_in_order_with_per_file_line_numbers(tmp_path: Path) -> None:
    first = write_jsonl(tmp_path / "a.jsonl", GOOD[:5])
    second = write_jsonl(tmp_path / "b.jsonl", [*GOOD[5:], {"messages": []}])

    with pytest.raises(InvalidDatasetError) as raised:
        prepare(LocalFiles(paths=[first, second]), tmp_path / "out")

    assert [(p.source, p.line) for p in raised.value.report.first_problems] == [("b.jsonl", 6)]


def test_parquet_input_gives_the_same_split_files_as_the_same_rows_in_jsonl(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [chat(f"question {i}?", f"answer {i}.", prompt=f"question {i}?") for i in range(20)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chats.parquet")
    write_jsonl(tmp_path / "chats.jsonl", rows)

    from_parquet = prepare(tmp_path / "chats.parquet", tmp_path / "parquet")
    from_jsonl = prepare(tmp_path / "chats.jsonl", tmp_path / "jsonl")

    assert from_parquet.train_file.sha256 == from_jsonl.train_file.sha256
    assert from_parquet.test_file.sha256 == from_jsonl.test_file.sha256


def test_a_bad_parquet_row_is_reported_by_row_index(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [*GOOD[:3], {"messages": [user(), {"role": "bot", "content": "x"}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chats.parquet")

    with pytest.raises(InvalidDatasetError, match=r"chats\.parquet row 3: messages\[1\]\.role: 'bot'"):
        prepare(tmp_path / "chats.parquet", tmp_path / "out")


def test_a_directory_saved_with_datasets_is_read_like_the_same_rows_in_jsonl(tmp_path: Path) -> None:
    import datasets

    rows = [chat(f"question {i}?", f"answer {i}.") for i in range(20)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    write_jsonl(tmp_path / "chats.jsonl", rows)

    from_saved = prepare(tmp_path / "saved", tmp_path / "saved-out")
    from_jsonl = prepare(tmp_path / "chats.jsonl", tmp_path / "jsonl-out")

    assert from_saved.train_file.sha256 == from_jsonl.train_file.sha256
    assert from_saved.test_file.sha256 == from_jsonl.test_file.sha256


def test_a_saved_dataset_dict_reads_the_split_named_in_the_source(tmp_path: Path) -> None:
    import datasets

    splits = datasets.DatasetDict(
        train_sft=datasets.Dataset.from_list(GOOD), test_sft=datasets.Dataset.from_list(GOOD[:3])
    )
    splits.save_to_disk(str(tmp_path / "saved"))

    rows = list(load_rows(LocalFiles(paths=[tmp_path / "saved"], split="test_sft")))

    assert [row.value for row in rows] == GOOD[:3]
    assert rows[2].origin.describe() == "saved/test_sft row 2"


def test_a_saved_dataset_dict_without_a_chosen_split_names_the_splits_it_has(tmp_path: Path) -> None:
    import datasets

    splits = datasets.DatasetDict(a=datasets.Dataset.from_list(GOOD), b=datasets.Dataset.from_list(GOOD))
    splits.save_to_disk(str(tmp_path / "saved"))

    with pytest.raises(DatasetSourceError, match=r"has splits a, b; set dataset\.split"):
        list(load_rows(tmp_path / "saved"))


def test_a_percent_slice_resolves_with_the_split_size_like_datasets_rounds_it() -> None:
    chosen = resolve_split_slice("train_sft[:1%]", {"train_sft": 207_865})

    assert (chosen.split, chosen.start, chosen.stop) == ("train_sft", 0, 2079)


def test_an_absolute_slice_needs_no_split_size() -> None:
    chosen = resolve_split_slice("train_sft[100:2100]", None)

    assert (chosen.split, chosen.start, chosen.stop) == ("train_sft", 100, 2100)


@pytest.mark.parametrize("spec", ["train_sft[:1%]", "train_sft[-500:]"])
def test_a_relative_slice_without_a_known_split_size_suggests_an_absolute_slice(spec: str) -> None:
    with pytest.raises(DatasetSourceError, match=r"use an absolute row slice such as 'train_sft\[:2000\]'"):
        resolve_split_slice(spec, None)


def test_a_slice_of_a_split_the_dataset_does_not_have_lists_the_splits_it_has() -> None:
    with pytest.raises(DatasetSourceError, match=r"names split 'train', .* its splits: train_sft, test_sft"):
        resolve_split_slice("train[:1%]", {"train_sft": 207_865, "test_sft": 23_110})


def hub_layout(folder: Path, rows: list[Any], *, publish_sizes: bool) -> str:
    """A dataset repository laid out as on the hub: data files plus a card that may carry split sizes."""
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows)
    sizes = f"  splits:\n  - name: train\n    num_examples: {len(rows)}\n    num_bytes: 0\n"
    card = (
        "---\n"
        + ("dataset_info:\n" + sizes if publish_sizes else "")
        + "configs:\n- config_name: default\n  data_files:\n  - split: train\n    path: train.jsonl\n---\n"
    )
    (folder / "README.md").write_text(card, encoding="utf-8")
    return str(folder)


ROWS_40 = [chat(f"question {i}?", f"answer {i}.") for i in range(40)]


@pytest.mark.parametrize("split", ["train[:10%]", "train[-7:]", "train[5:9]", "train[33%:50%]"])
def test_a_streamed_slice_yields_the_rows_datasets_would_load_without_streaming(
    tmp_path: Path, split: str
) -> None:
    import datasets

    repository = hub_layout(tmp_path / "repo", ROWS_40, publish_sizes=True)
    expected = list(datasets.load_dataset(repository, split=split, cache_dir=str(tmp_path / "cache")))

    rows = list(load_rows(HubDataset(id=repository, split=split)))

    assert [row.value for row in rows] == expected
    assert [row.origin.row for row in rows] == [ROWS_40.index(value) for value in expected]


def test_a_percent_slice_of_a_dataset_without_published_sizes_asks_for_an_absolute_slice(
    tmp_path: Path,
) -> None:
    repository = hub_layout(tmp_path / "repo", ROWS_40, publish_sizes=False)

    with pytest.raises(DatasetSourceError, match=r"such as 'train\[:2000\]'"):
        list(load_rows(HubDataset(id=repository, split="train[:10%]")))


def test_a_streamed_split_the_dataset_does_not_have_is_named_in_the_error(tmp_path: Path) -> None:
    repository = hub_layout(tmp_path / "repo", ROWS_40, publish_sizes=False)

    with pytest.raises(DatasetSourceError, match=r"dataset.split 'validation\[:5\]': Bad split: validation"):
        list(load_rows(HubDataset(id=repository, split="validation[:5]")))


def test_a_sum_of_splits_is_rejected() -> None:
    with pytest.raises(DatasetSourceError, match="combines splits"):
        resolve_split_slice("train_sft+test_sft", None)


def test_reading_the_hub_offline_fails_with_a_message_that_points_at_local_files(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        from pipeline.chat_dataset import DatasetSourceError, HubDataset, load_rows
        for split in ("train_sft[:1%]", "train_sft[:2000]"):
            try:
                next(load_rows(HubDataset(split=split)))
            except DatasetSourceError as error:
                print(error)
        """
    )
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}

    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=PROJECT_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )

    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout + result.stderr
    for line, split in zip(lines, ("train_sft[:1%]", "train_sft[:2000]"), strict=True):
        assert line.startswith(f"could not read Hugging Face dataset '{HubDataset().id}' split '{split}'")
        assert "point the dataset at local files" in line


def test_token_statistics_use_the_tokenizer_passed_in(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    rows = [
        chat(f"How long is warranty number {i}?", f"Warranty {i} lasts {i + 1} years.") for i in range(30)
    ]
    texts = [m["content"] for row in rows for m in row["messages"]]
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=120, special_tokens=["[UNK]"]))

    def count(text: str) -> int:
        return len(tokenizer.encode(text).ids)

    path = write_jsonl(tmp_path / "chats.jsonl", rows)
    report = prepare(path, tmp_path / "bpe", count_tokens=count, tokenizer_name="test-bpe-120", epochs=2)
    approx = prepare(path, tmp_path / "approx", epochs=2)

    lengths = [sum(count(m["content"]) + MESSAGE_OVERHEAD_TOKENS for m in row["messages"]) for row in rows]
    assert report.tokens.tokenizer == "test-bpe-120"
    assert report.tokens.total_tokens == sum(lengths)
    assert report.tokens.assistant_tokens == sum(count(row["messages"][1]["content"]) for row in rows)
    assert (report.tokens.min, report.tokens.max) == (min(lengths), max(lengths))
    train_lengths = [
        sum(count(m["content"]) + MESSAGE_OVERHEAD_TOKENS for m in row["messages"])
        for row in read_jsonl(report.train_file.path)
    ]
    assert report.estimated_training_tokens == 2 * sum(train_lengths)
    assert approx.tokens.tokenizer == APPROX_TOKENIZER
    assert approx.tokens.total_tokens != report.tokens.total_tokens


def test_approximate_token_statistics_count_utf8_bytes_over_four_per_message(tmp_path: Path) -> None:
    rows = [chat("a" * 8, "é" * 6), chat("b" * 40, "c" * 3)]  # é is two bytes in UTF-8

    report = prepare(write_jsonl(tmp_path / "chats.jsonl", rows), tmp_path / "out")

    overhead = 2 * MESSAGE_OVERHEAD_TOKENS
    assert report.tokens.model_dump() == {
        "tokenizer": APPROX_TOKENIZER,
        "max_tokens": 4096,
        "total_tokens": (2 + 3 + overhead) + (10 + 1 + overhead),
        "assistant_tokens": 3 + 1,
        "min": 2 + 3 + overhead,
        "mean": ((2 + 3 + overhead) + (10 + 1 + overhead)) / 2,
        "p50": 2 + 3 + overhead,
        "p95": 10 + 1 + overhead,
        "max": 10 + 1 + overhead,
        "rows_over_max_tokens": 0,
    }


def test_rows_over_max_tokens_are_counted_and_dropped_when_allowed(tmp_path: Path) -> None:
    rows = [*GOOD, chat("long", "word " * 100), chat("longer", "word " * 200)]

    report = prepare(
        write_jsonl(tmp_path / "chats.jsonl", rows), tmp_path / "out", max_tokens=64, drop_invalid=True
    )

    assert report.tokens.rows_over_max_tokens == 2
    assert report.tokens.max <= 64
    assert report.problem_counts == {"too_long": 2}


def test_the_report_is_small_json_for_durable_history(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chats.jsonl", [*GOOD, *([b"{" + b"x" * 5000] * 200)])

    report = prepare(path, tmp_path / "out", drop_invalid=True)

    assert len(report.model_dump_json()) < 20_000


def test_a_tokenizer_counter_counts_without_special_tokens_and_names_the_tokenizer(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(special_tokens=["[UNK]", "<s>"])
    raw.train_from_iterator(["hello there general kenobi"] * 5, trainer)
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=raw, name_or_path="tiny-bpe")

    raw_count, wrapped_count = tokenizer_counter(raw), tokenizer_counter(wrapped)

    assert raw_count("hello there") == wrapped_count("hello there") == len(raw.encode("hello there").ids) - 1
    assert (raw_count.__name__, wrapped_count.__name__) == ("Tokenizer", "tiny-bpe")
    path = write_jsonl(tmp_path / "chats.jsonl", GOOD)
    assert prepare(path, tmp_path / "out", count_tokens=wrapped_count).tokens.tokenizer == "tiny-bpe"


def test_a_file_written_on_windows_with_a_byte_order_mark_and_crlf_reads_cleanly(tmp_path: Path) -> None:
    lines = [json.dumps(row) for row in GOOD]
    (tmp_path / "chats.jsonl").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8") + b"\r\n")

    assert [row.value for row in load_rows(tmp_path / "chats.jsonl")] == GOOD


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_a_file_saved_as_utf16_or_utf32_is_refused_whole_naming_its_encoding(
    tmp_path: Path, encoding: str
) -> None:
    # json.loads guesses each line's encoding: split at b"\n", most UTF-16 lines would pass and others fail.
    text = "".join(json.dumps(row) + "\n" for row in GOOD)
    (tmp_path / "chats.jsonl").write_bytes(text.encode(encoding))

    with pytest.raises(
        DatasetSourceError, match=r"chats\.jsonl is encoded as UTF-(16|32).*save it again as UTF-8"
    ):
        prepare(tmp_path / "chats.jsonl", tmp_path / "out", drop_invalid=True)


def _write_parquet(folder: Path, rows: list[Any]) -> Path | HubDataset:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), folder / "chats.parquet")
    return folder / "chats.parquet"


def _save_to_disk(folder: Path, rows: list[Any]) -> Path | HubDataset:
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(folder / "saved"))
    return folder / "saved"


def _hub_repository_of_parquet(folder: Path, rows: list[Any]) -> Path | HubDataset:
    (folder / "repo").mkdir()
    _write_parquet(folder / "repo", rows)
    card = "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: chats.parquet\n"
    (folder / "repo" / "README.md").write_text(card + "---\n", encoding="utf-8")
    return HubDataset(id=str(folder / "repo"), split="train")


@pytest.mark.parametrize("write", [_write_parquet, _save_to_disk, _hub_repository_of_parquet])
def test_a_key_on_one_message_of_an_arrow_source_is_not_blamed_on_the_messages_without_it(
    tmp_path: Path, write: Any
) -> None:
    # Arrow gives all messages of a column one struct type: the others read back with name=None.
    named = {"messages": [{**user(), "name": "bob"}, assistant()]}
    source = write(tmp_path, [named, *GOOD])
    write_jsonl(tmp_path / "chats.jsonl", [named, *GOOD])

    from_arrow = prepare_dataset(load_rows(source), out_dir=tmp_path / "arrow", drop_invalid=True)
    from_jsonl = prepare(tmp_path / "chats.jsonl", tmp_path / "jsonl", drop_invalid=True)

    assert [(p.row, p.field) for p in from_arrow.first_problems] == [(0, "messages[0].name")]
    assert from_arrow.train_file.sha256 == from_jsonl.train_file.sha256
    assert from_arrow.test_file.sha256 == from_jsonl.test_file.sha256


def test_a_damaged_page_of_a_parquet_file_is_an_error_naming_the_file_and_the_row_reading_stopped_at(
    tmp_path: Path,
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "chats.parquet"
    pq.write_table(pa.Table.from_pylist(GOOD * 1000), path, row_group_size=2500)
    offset = pq.ParquetFile(path).metadata.row_group(3).column(1).data_page_offset
    damaged = bytearray(path.read_bytes())
    damaged[offset : offset + 16] = b"\xff" * 16  # the page header of the last row group's content column
    path.write_bytes(bytes(damaged))

    with pytest.raises(
        DatasetSourceError, match=r"chats\.parquet cannot be read from row \d+ on, the file is damaged"
    ):
        prepare(path, tmp_path / "out")


def test_a_raw_tab_inside_a_string_is_named_with_its_column_and_how_to_escape_it(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "chats.jsonl", [*GOOD, b'{"messages": [{"role": "user", "content": "a\tb"}]}']
    )

    with pytest.raises(InvalidDatasetError) as raised:
        prepare(path, tmp_path / "out")

    assert str(raised.value.report.first_problems[0]) == (
        "chats.jsonl line 11: not valid JSON: a raw control character (U+0009) inside a string at column 45; "
        "JSON needs it escaped (\\t, \\n, \\u0000)"
    )


def test_upper_case_suffixes_are_read_directly_in_the_run_config_and_in_a_folder(tmp_path):
    # Windows tools write CHATS.JSONL as readily as chats.jsonl: in a folder, such files were skipped
    # without a word; named directly, the run config refused them.
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.config import parse_run_config
    from settings import AppSettings

    folder = tmp_path / "export"
    folder.mkdir()
    write_jsonl(folder / "A.JSONL", GOOD[:5])
    pq.write_table(pa.Table.from_pylist(GOOD[5:]), folder / "B.Parquet")

    rows = list(load_rows(LocalFiles(paths=[folder])))
    direct = list(load_rows(folder / "A.JSONL"))
    cfg = parse_run_config(
        {"preset": "smoke", "dataset": {"files": [str(folder / "A.JSONL"), str(folder)]}},
        AppSettings(PHI3_BACKEND="local"),
    )

    assert [r.value for r in rows] == GOOD and [r.value for r in direct] == GOOD[:5]
    assert cfg.dataset.files == [str(folder / "A.JSONL"), str(folder)]
