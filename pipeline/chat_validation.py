"""Checks one chat-format training row the way hosted fine-tuning services do, before any GPU time.

A row is a JSON object with a ``messages`` list of ``{"role", "content"}`` objects: an optional
system message first, then user and assistant turns alternating, starting with the user and ending
with the assistant (the answer the model is trained on). Other top-level keys, such as ultrachat's
``prompt`` and ``prompt_id``, are allowed and stripped on output. Reason codes follow the OpenAI
cookbook's data-prep checks and Together's ``check_file`` so messages look familiar.

Also here: the report of checking a whole dataset (``DatasetReport``) and the errors that carry it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content")
_ROLE_SET = frozenset(ROLES)
APPROX_TOKENIZER = "approx-bytes/4"
# Phi-3's chat template frames each message as `<|role|>\n{content}<|end|>\n`: a role token, a
# newline, an end token and a newline around the content. Counting them keeps the length check honest
# for conversations with many short turns.
MESSAGE_OVERHEAD_TOKENS = 4

CountTokens = Callable[[str], int]
PROBLEMS_IN_ERROR_MESSAGE = 5


def json_refusal(error: RecursionError | ValueError) -> str:
    """Why Python would not read valid-looking JSON: nesting past its recursion limit, or a number of
    more than 4300 digits (the first clause of its message; the rest is advice for programmers)."""
    if isinstance(error, RecursionError):
        return "not valid JSON here: nested too deeply"
    return f"not valid JSON here: {str(error).split(';')[0]}"


class ProblemReason(StrEnum):
    INVALID_JSON = "invalid_json"
    INVALID_ENCODING = "invalid_encoding"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_MESSAGES = "missing_messages"
    MESSAGES_NOT_A_LIST = "messages_not_a_list"
    EMPTY_MESSAGES = "empty_messages"
    MESSAGE_NOT_AN_OBJECT = "message_not_an_object"
    MESSAGE_MISSING_KEY = "message_missing_key"
    MESSAGE_UNRECOGNIZED_KEY = "message_unrecognized_key"
    UNRECOGNIZED_ROLE = "unrecognized_role"
    CONTENT_NOT_A_STRING = "content_not_a_string"
    EMPTY_CONTENT = "empty_content"
    ROLES_NOT_ALTERNATING = "roles_not_alternating"
    MISSING_USER_MESSAGE = "missing_user_message"
    DOES_NOT_END_WITH_ASSISTANT = "does_not_end_with_assistant"
    TOO_LONG = "too_long"


@dataclass(frozen=True, slots=True)
class RowOrigin:
    """Where a row came from: a file (or hub split) and its position in it."""

    source: str
    row: int  # 0-based index of the row within its source
    line: int | None = None  # 1-based physical line, for JSONL files

    def describe(self) -> str:
        if self.line is not None:
            return f"{self.source} line {self.line}"
        return f"{self.source} row {self.row}"


class Problem(BaseModel):
    """One reason a row cannot be trained on, located precisely enough to fix it."""

    model_config = ConfigDict(frozen=True)

    source: str | None = None
    line: int | None = None
    row: int | None = None
    reason: ProblemReason
    field: str
    message: str

    def __str__(self) -> str:
        if self.source is None:
            return self.message
        return f"{RowOrigin(self.source, self.row or 0, self.line).describe()}: {self.message}"


@dataclass(slots=True)
class Issue:
    reason: ProblemReason
    field: str
    message: str

    def at(self, origin: RowOrigin | None) -> Problem:
        if origin is None:
            return Problem(reason=self.reason, field=self.field, message=self.message)
        return Problem(
            source=origin.source,
            line=origin.line,
            row=origin.row,
            reason=self.reason,
            field=self.field,
            message=self.message,
        )


@dataclass(slots=True)
class RowCheck:
    """The outcome of checking one row; token counts are set only for rows that passed."""

    issues: list[Issue] = field(default_factory=list)
    messages: list[dict[str, str]] | None = None
    total_tokens: int = 0
    assistant_tokens: int = 0


class TokenStats(BaseModel):
    """Token counts over the rows written (train + test), like the OpenAI cookbook's data-prep report."""

    tokenizer: str
    max_tokens: int
    total_tokens: int
    assistant_tokens: int
    min: int
    mean: float
    p50: int
    p95: int
    max: int
    rows_over_max_tokens: int


def token_stats(
    lengths: list[int], assistant_tokens: int, rows_over_max_tokens: int, tokenizer: str, max_tokens: int
) -> TokenStats:
    """Distribution of per-conversation token counts (nearest-rank percentiles)."""
    ordered = sorted(lengths)
    count = len(ordered)

    def percentile(p: float) -> int:
        return ordered[max(math.ceil(p * count) - 1, 0)] if count else 0

    return TokenStats(
        tokenizer=tokenizer,
        max_tokens=max_tokens,
        total_tokens=sum(ordered),
        assistant_tokens=assistant_tokens,
        min=ordered[0] if count else 0,
        mean=round(sum(ordered) / count, 2) if count else 0.0,
        p50=percentile(0.50),
        p95=percentile(0.95),
        max=ordered[-1] if count else 0,
        rows_over_max_tokens=rows_over_max_tokens,
    )


def approx_token_count(text: str) -> int:
    """UTF-8 bytes / 4, rounded up: within ~20% of BPE tokenizers on English chat, and free."""
    return (len(text.encode("utf-8")) + 3) // 4


def tokenizer_counter(tokenizer: Any) -> CountTokens:
    """``count_tokens`` for a transformers tokenizer or a ``tokenizers.Tokenizer``, named after it.

    Special tokens are left out: the per-message overhead already accounts for the chat template.
    """

    def count(text: str) -> int:
        encoded = tokenizer.encode(text, add_special_tokens=False)
        return len(getattr(encoded, "ids", encoded))  # tokenizers returns an Encoding, transformers a list

    count.__name__ = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return count


def validate_row(
    value: Any,
    *,
    count_tokens: CountTokens | None = None,
    max_tokens: int = 4096,
    origin: RowOrigin | None = None,
) -> list[Problem]:
    """Every problem that keeps ``value`` from being a trainable chat row; empty when it is fine."""
    check = check_row(value, count_tokens or approx_token_count, max_tokens)
    return [issue.at(origin) for issue in check.issues]


def check_row(value: Any, count_tokens: CountTokens, max_tokens: int) -> RowCheck:
    """The hot path of dataset preparation: structural checks, then token counts for good rows."""
    if not isinstance(value, dict):
        return _fail(
            ProblemReason.NOT_AN_OBJECT,
            "",
            f"row is {_json_type(value)}, expected a JSON object with a 'messages' list",
        )
    if "messages" not in value:
        keys = ", ".join(sorted(map(str, value))) or "none"
        return _fail(
            ProblemReason.MISSING_MESSAGES,
            "messages",
            f"messages: missing; a row needs a list of {{role, content}} objects (keys found: {keys})",
        )
    messages = value["messages"]
    if not isinstance(messages, list):
        return _fail(
            ProblemReason.MESSAGES_NOT_A_LIST,
            "messages",
            f"messages: expected a list of {{role, content}} objects, got {_json_type(messages)}",
        )
    if not messages:
        return _fail(ProblemReason.EMPTY_MESSAGES, "messages", "messages: the list is empty")
    roles = _roles_if_well_formed(messages)
    if roles is None:
        return RowCheck(issues=_check_messages(messages))
    issues = _check_turn_order(roles)
    if issues:
        return RowCheck(issues=issues)
    return _measure(messages, count_tokens, max_tokens)


def _roles_if_well_formed(messages: list[Any]) -> list[str] | None:
    """One cheap pass for the common, valid case; None means ``_check_messages`` will find a problem."""
    roles = []
    for message in messages:
        if not isinstance(message, dict) or len(message) != 2:
            return None
        role, content = message.get("role"), message.get("content")
        if not (isinstance(role, str) and role in _ROLE_SET and isinstance(content, str)):
            return None
        if not content or content.isspace():
            return None
        roles.append(role)
    return roles


def _measure(messages: list[dict[str, str]], count_tokens: CountTokens, max_tokens: int) -> RowCheck:
    total = 0
    assistant = 0
    for message in messages:
        tokens = count_tokens(message["content"])
        total += tokens + MESSAGE_OVERHEAD_TOKENS
        if message["role"] == "assistant":
            assistant += tokens
    if total > max_tokens:
        return _fail(
            ProblemReason.TOO_LONG,
            "messages",
            f"messages: the conversation is {total} tokens long, over the limit of {max_tokens} "
            "(dataset.max_tokens, or the model's context if smaller); the trainer would cut off the end, "
            "which is the assistant's answer",
        )
    return RowCheck(messages=messages, total_tokens=total, assistant_tokens=assistant)


def _check_messages(messages: list[Any]) -> list[Issue]:
    issues: list[Issue] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            issues.append(
                Issue(
                    ProblemReason.MESSAGE_NOT_AN_OBJECT,
                    where,
                    f"{where}: expected a {{role, content}} object, got {_json_type(message)}",
                )
            )
            continue
        if len(message) != 2 or "role" not in message or "content" not in message:
            issues.extend(_key_issues(message, where))
        if "role" in message and not (isinstance(message["role"], str) and message["role"] in ROLES):
            issues.append(
                Issue(
                    ProblemReason.UNRECOGNIZED_ROLE,
                    f"{where}.role",
                    f"{where}.role: {_short(message['role'])} is not one of {', '.join(ROLES)}",
                )
            )
        if "content" in message:
            content = message["content"]
            if not isinstance(content, str):
                issues.append(
                    Issue(
                        ProblemReason.CONTENT_NOT_A_STRING,
                        f"{where}.content",
                        f"{where}.content: expected a string, got {_json_type(content)}",
                    )
                )
            elif not content or content.isspace():
                issues.append(
                    Issue(ProblemReason.EMPTY_CONTENT, f"{where}.content", f"{where}.content: is empty")
                )
    return issues


def _key_issues(message: dict[Any, Any], where: str) -> list[Issue]:
    issues = [
        Issue(ProblemReason.MESSAGE_MISSING_KEY, f"{where}.{key}", f"{where}: missing key '{key}'")
        for key in MESSAGE_KEYS
        if key not in message
    ]
    issues.extend(
        Issue(
            ProblemReason.MESSAGE_UNRECOGNIZED_KEY,
            f"{where}.{key}",
            f"{where}.{key}: unrecognized key; a message has only 'role' and 'content'",
        )
        for key in sorted(map(str, message))
        if key not in MESSAGE_KEYS
    )
    return issues


def _check_turn_order(roles: list[str]) -> list[Issue]:
    if "user" not in roles:
        return [
            Issue(
                ProblemReason.MISSING_USER_MESSAGE,
                "messages",
                "messages: no message has role 'user'; a conversation needs a user turn answered by "
                "the assistant",
            )
        ]
    expected = "user"
    for index in range(1 if roles[0] == "system" else 0, len(roles)):
        if roles[index] != expected:
            hint = (
                "a system message may only come first"
                if roles[index] == "system"
                else "after an optional first system message, turns alternate user, assistant, user, ..."
            )
            return [
                Issue(
                    ProblemReason.ROLES_NOT_ALTERNATING,
                    f"messages[{index}].role",
                    f"messages[{index}].role: '{roles[index]}' where '{expected}' was expected; {hint}",
                )
            ]
        expected = "assistant" if expected == "user" else "user"
    if roles[-1] != "assistant":
        last = len(roles) - 1
        return [
            Issue(
                ProblemReason.DOES_NOT_END_WITH_ASSISTANT,
                f"messages[{last}].role",
                f"messages[{last}].role: the conversation ends with a '{roles[-1]}' message; "
                "the last message must be the assistant's answer to train on",
            )
        ]
    return []


def _fail(reason: ProblemReason, field_path: str, message: str) -> RowCheck:
    return RowCheck(issues=[Issue(reason, field_path, message)])


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({value!r})"
    if isinstance(value, int | float):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({_short(value)})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------- the dataset's report


class DatasetError(ValueError):
    """A dataset that cannot become a train/test split; the message says what to change."""


class OutputFile(BaseModel):
    path: str
    sha256: str
    rows: int
    bytes: int


class DatasetReport(BaseModel):
    """Small enough for Durable history: counts, stats, the first problems and where the rest are."""

    rows_read: int
    rows_valid: int
    rows_invalid: int
    rows_dropped: int
    train_rows: int
    test_rows: int
    test_size: float
    seed: int
    epochs: float
    problem_counts: dict[str, int]
    first_problems: list[Problem]
    problems_file: str | None
    tokens: TokenStats
    estimated_training_tokens: int
    train_file: OutputFile | None = None
    test_file: OutputFile | None = None


class InvalidDatasetError(DatasetError):
    """Some rows are invalid and dropping them was not allowed; ``report`` lists them."""

    def __init__(self, report: DatasetReport) -> None:
        self.report = report
        shown = "; ".join(str(problem) for problem in report.first_problems[:PROBLEMS_IN_ERROR_MESSAGE])
        where = f" (all problems: {report.problems_file})" if report.problems_file else ""
        super().__init__(
            f"{report.rows_invalid} of {report.rows_read} rows are invalid; first problems: {shown}{where}; "
            "set dataset.drop_invalid_rows=true to drop them"
        )

    def __reduce__(self) -> tuple[type[InvalidDatasetError], tuple[DatasetReport]]:
        return (type(self), (self.report,))  # pickles across process pools with its report
