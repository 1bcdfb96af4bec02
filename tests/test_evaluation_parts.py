"""The evaluation goes on where it stopped: a Functions activity must end within host.json's
functionTimeout, so the evaluate step asks the models until its time budget is spent, keeps every scored
row on disk, and the next call (after the orchestrator's durable timer) resumes from them. Each
conversation is answered once per model, across calls and across a worker killed mid-write.

The answerers here are plain functions standing in for the endpoint (outside this code); the real
flow runner answering through a deployment is tests/test_flow.py's; the clock is a counter, so where
a call stops does not depend on this machine's speed.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest

import pipeline.evaluation as evaluation
from pipeline.evaluation import EvalProgress, ModelComparison, evaluate_base_vs_finetuned, load_eval_cases

CASES = [([{"role": "user", "content": f"question {i}?"}], f"answer {i}") for i in range(5)]


class Models:
    def __init__(self) -> None:
        self.asked: Counter[tuple[str, str]] = Counter()

    def answerer(self, model: str):
        def answer(messages: list[dict[str, str]]) -> str:
            question = messages[-1]["content"]
            self.asked[(model, question)] += 1
            return question.replace("question", "answer").rstrip("?") if model == "finetuned" else "no idea"

        return answer


@pytest.fixture
def clock(monkeypatch):
    """time.monotonic() as 0, 1, 2, ... from each ``clock()`` on."""

    def restart() -> None:
        ticks = itertools.count()
        monkeypatch.setattr(evaluation, "monotonic", lambda: next(ticks))

    restart()
    return restart


def run(models: Models, out_dir, until: float | None):
    return evaluate_base_vs_finetuned(
        CASES, models.answerer("finetuned"), models.answerer("base"), out_dir=out_dir, until=until
    )


def test_a_call_that_runs_out_of_time_hands_back_and_the_next_goes_on_from_its_rows(tmp_path, clock):
    models = Models()

    # A question is started while the clock is short of the budget: 3 ticks, then it is spent (the
    # first question of a call is always asked, so every call makes progress).
    first = run(models, tmp_path, until=3)

    assert isinstance(first, EvalProgress)
    assert (first.finetuned_rows, first.base_rows, first.cases) == (4, 0, 5)
    assert str(first) == "4, base 0 of 5 conversations answered"
    clock()
    second = run(models, tmp_path, until=2)  # the last fine-tuned one, then 2 of the base model's
    assert isinstance(second, EvalProgress) and (second.finetuned_rows, second.base_rows) == (5, 2)
    clock()
    done = run(models, tmp_path, until=None)

    assert isinstance(done, ModelComparison)
    assert (done.finetuned.rows, done.base.rows, done.finetuned.errors) == (5, 5, 0)
    assert done.finetuned.rouge_l == 1.0 and done.delta["rouge_l"] > 0
    assert set(models.asked.values()) == {1} and len(models.asked) == 10  # each asked once per model
    side_by_side = [json.loads(line) for line in (tmp_path / "side_by_side.jsonl").read_text().splitlines()]
    assert [row["index"] for row in side_by_side] == list(range(5))


def test_a_call_that_spent_its_budget_on_the_fine_tuned_model_leaves_the_base_model_to_the_next(
    tmp_path, clock
):
    models = Models()
    run(models, tmp_path, until=3)  # 4 of the fine-tuned model's answers
    clock()

    second = run(models, tmp_path, until=0)  # its first question is asked; then the budget holds

    assert isinstance(second, EvalProgress) and (second.finetuned_rows, second.base_rows) == (5, 0)
    assert not [key for key in models.asked if key[0] == "base"]
    assert (tmp_path / "base.jsonl").read_text() == ""


def test_every_call_answers_at_least_one_question_however_small_the_budget(tmp_path, clock):
    models = Models()
    calls = 0
    while not isinstance(result := run(models, tmp_path, until=-1), ModelComparison):
        calls += 1
        assert calls <= 10, result
        clock()

    assert calls == 9 and set(models.asked.values()) == {1}  # one question a call


def test_a_row_cut_short_by_a_killed_worker_is_asked_again_and_nothing_else_is(tmp_path, clock):
    models = Models()
    run(models, tmp_path, until=3)
    rows = tmp_path / "finetuned.jsonl"
    rows.write_text(rows.read_text()[:-20])  # the fourth row's write was cut off

    clock()
    done = run(models, tmp_path, until=None)

    assert isinstance(done, ModelComparison) and done.finetuned.rows == 5
    assert models.asked[("finetuned", "question 3?")] == 2
    assert sum(models.asked.values()) == 11


def test_rows_of_other_questions_are_not_reused(tmp_path, clock):
    models = Models()
    run(models, tmp_path, until=3)
    changed = [([{"role": "user", "content": "something else?"}], "x"), *CASES[1:]]

    done = evaluate_base_vs_finetuned(changed, models.answerer("finetuned"), None, out_dir=tmp_path)

    assert isinstance(done, ModelComparison) and done.finetuned.rows == 5 and done.base is None
    assert models.asked[("finetuned", "question 1?")] == 2  # the test split changed: all asked anew


def test_answers_in_other_scripts_are_scored_on_their_words(tmp_path):
    # The reference word for word scores 1.0 in any script (azure-ai-evaluation's ROUGE tokenizer keeps
    # only [a-z0-9], which left a Russian or Chinese answer no words and a score of 0.0); word order
    # counts as in English: 2 of 3 words in sequence is precision = recall = 2/3.
    cases = [
        ([{"role": "user", "content": "Столица России?"}], "Москва — столица России."),
        ([{"role": "user", "content": "Где столица?"}], "Москва — столица России."),
        ([{"role": "user", "content": "你好吗？"}], "我很好，谢谢。"),
    ]
    answers = {
        "Столица России?": "Москва — столица России.",
        "Где столица?": "Столица России — Москва",
        "你好吗？": "我很好，谢谢。",
    }

    done = evaluate_base_vs_finetuned(
        cases, lambda messages: answers[messages[-1]["content"]], None, out_dir=tmp_path
    )

    assert isinstance(done, ModelComparison)
    rows = [
        json.loads(line) for line in (tmp_path / "finetuned.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert [row["rouge_l"] for row in rows] == [1.0, 0.6667, 1.0]
    assert done.finetuned.rouge_l == round((1.0 + 0.6667 + 1.0) / 3, 4)


def test_a_line_separator_inside_a_message_neither_breaks_the_test_split_nor_the_rows_kept(tmp_path, clock):
    # The test split and the rows are JSON written with ensure_ascii=False: U+2028 (text pasted from the
    # web) stays raw inside a string, and only "\n" ends a line.
    conversations = [
        [{"role": "user", "content": f"question {i}?\u2028"}, {"role": "assistant", "content": f"answer {i}"}]
        for i in range(3)
    ]
    test_file = tmp_path / "test.jsonl"
    test_file.write_text(
        "".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in conversations),
        encoding="utf-8",
    )
    models = Models()

    cases = load_eval_cases(test_file, sample_size=10)
    first = evaluate_base_vs_finetuned(cases, models.answerer("finetuned"), None, out_dir=tmp_path, until=1)
    clock()
    done = evaluate_base_vs_finetuned(cases, models.answerer("finetuned"), None, out_dir=tmp_path)

    assert [prompt for prompt, _ in cases] == [m[:1] for m in conversations]
    assert [case[1] for case in cases] == ["answer 0", "answer 1", "answer 2"]
    assert isinstance(first, EvalProgress) and first.finetuned_rows == 2
    assert isinstance(done, ModelComparison) and done.finetuned.rows == 3
    assert set(models.asked.values()) == {1} and len(models.asked) == 3  # none asked again
