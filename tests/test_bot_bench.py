"""``bench/bot.py`` judges the relay goals on every row it measured, not only the first."""

from __future__ import annotations

import asyncio
import itertools

from bench.bot import print_goals, verdicts


def row(concurrency: int, *, direct_p50: float, relay_p50: float, direct_rate: float, relay_rate: float):
    return {
        "concurrency": concurrency,
        "direct": {"p50_ms": direct_p50, "turns_per_s": direct_rate},
        "relay": {"p50_ms": relay_p50, "turns_per_s": relay_rate},
    }


def test_a_slow_row_after_a_good_first_row_fails_the_goal_and_is_named(capsys):
    rows = [
        row(1, direct_p50=50, relay_p50=55, direct_rate=400, relay_rate=350),
        row(8, direct_p50=50, relay_p50=58, direct_rate=900, relay_rate=800),
        row(64, direct_p50=60, relay_p50=100, direct_rate=1000, relay_rate=290),
    ]
    print_goals(rows)
    out = capsys.readouterr().out
    assert "p50 <= 1.2x direct at every concurrency: not met (at 64 conversation(s))" in out
    assert ">= 300 turns/s through the relay: not met (at 64 conversation(s))" in out


def test_a_rate_the_endpoint_itself_cannot_reach_is_not_held_against_the_relay(capsys):
    capped = row(8, direct_p50=53, relay_p50=58, direct_rate=149, relay_rate=132)
    assert verdicts(capped) == {"p50": "met", "rate": "n/a"}
    print_goals([capped, row(64, direct_p50=60, relay_p50=70, direct_rate=950, relay_rate=800)])
    out = capsys.readouterr().out
    assert "p50 <= 1.2x direct at every concurrency: met" in out
    assert "turns/s through the relay: met; n/a at 8 (capped by the stub's answer time)" in out


def test_every_row_within_the_goals_is_met(capsys):
    print_goals([row(n, direct_p50=50, relay_p50=59, direct_rate=1000, relay_rate=900) for n in (1, 8, 64)])
    out = capsys.readouterr().out
    assert "at every concurrency: met" in out and "turns/s through the relay: met (best 900)" in out


async def test_a_round_keeps_every_conversation_going_and_keeps_latencies_by_turn_number():
    """Concurrency is sustained: each conversation makes at least ``conversation_turns`` turns (or its
    share of ``turns``), and latencies are also kept by turn number (``[0]``: the start-up burst)."""
    from bench.bot import Load

    calls: dict[str, int] = {}

    async def way(conversation: str) -> None:
        calls[conversation] = calls.get(conversation, 0) + 1
        await asyncio.sleep(0)

    load = Load(None, "stub", "host")  # type: ignore[arg-type]
    by_turn, wall = await load.round(way, 3, turns=10, conversation_turns=5)
    assert sorted(calls.values()) == [5, 5, 5] and wall > 0
    assert [len(turn) for turn in by_turn] == [3] * 5 and all(t > 0 for t in itertools.chain(*by_turn))

    calls.clear()
    by_turn, _ = await load.round(way, 3, turns=20, conversation_turns=5)
    assert sorted(calls.values()) == [7, 7, 7]  # ceil(20 / 3): at least the round's turns in all
    assert [len(turn) for turn in by_turn] == [3] * 7
