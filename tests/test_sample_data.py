"""The shipped sample dataset: what the generator writes, it validates, and it can test recall."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from pipeline.chat_dataset import load_rows, prepare_dataset

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample_data"
CHATS = SAMPLE_DIR / "support_chats.jsonl"
FACTS = SAMPLE_DIR / "support_facts.json"


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_support_chats", SAMPLE_DIR / "make_support_chats.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    return [json.loads(line) for line in CHATS.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def probes() -> list[dict[str, str]]:
    return json.loads(FACTS.read_text(encoding="utf-8"))


def test_the_committed_files_are_exactly_what_the_generator_writes(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(SAMPLE_DIR / "make_support_chats.py"), "--out-dir", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=60,
    )

    assert (tmp_path / CHATS.name).read_bytes() == CHATS.read_bytes()
    assert (tmp_path / FACTS.name).read_bytes() == FACTS.read_bytes()


def test_the_sample_file_stays_small() -> None:
    assert CHATS.stat().st_size < 300_000


def test_the_sample_validates_clean_and_prepares_into_an_80_20_split(tmp_path: Path) -> None:
    report = prepare_dataset(load_rows(CHATS), out_dir=tmp_path)

    assert (report.rows_read, report.rows_invalid, report.problem_counts) == (400, 0, {})
    assert (report.train_rows, report.test_rows) == (320, 80)


def test_rows_follow_ultrachat_format_with_prompt_id_the_sha256_of_the_first_user_message(
    rows: list[dict[str, Any]],
) -> None:
    for row in rows:
        assert list(row) == ["prompt", "prompt_id", "messages"]
        first_user = next(m["content"] for m in row["messages"] if m["role"] == "user")
        assert row["prompt"] == first_user
        assert row["prompt_id"] == hashlib.sha256(first_user.encode("utf-8")).hexdigest()


def test_about_thirty_percent_of_rows_have_a_system_message_and_thirty_percent_two_turns(
    rows: list[dict[str, Any]],
) -> None:
    with_system = sum(row["messages"][0]["role"] == "system" for row in rows)
    two_turns = sum(sum(m["role"] == "user" for m in row["messages"]) == 2 for row in rows)

    assert (with_system, two_turns) == (120, 120)


def test_there_is_one_probe_per_fact_and_every_fact_is_trained_on(
    generator: ModuleType, rows: list[dict[str, Any]], probes: list[dict[str, str]]
) -> None:
    answers = [m["content"] for row in rows for m in row["messages"] if m["role"] == "assistant"]

    assert len(probes) == len(generator.FACTS) >= 25
    for probe in probes:
        assert sum(probe["answer_contains"] in answer for answer in answers) >= len(rows) // len(probes)


def test_each_probe_question_is_asked_in_training_and_answered_with_its_string(
    rows: list[dict[str, Any]], probes: list[dict[str, str]]
) -> None:
    for probe in probes:
        replies = [
            messages[i + 1]["content"]
            for messages in (row["messages"] for row in rows)
            for i, m in enumerate(messages)
            if m["role"] == "user" and m["content"].endswith(probe["question"])
        ]
        assert replies, f"probe question never asked in training: {probe['question']}"
        assert all(probe["answer_contains"] in reply for reply in replies)


def test_each_answer_string_belongs_to_exactly_one_fact(generator: ModuleType) -> None:
    for fact in generator.FACTS:
        holders = [other for other in generator.FACTS if fact.answer_contains in other.answer]
        assert holders == [fact], fact.answer_contains
