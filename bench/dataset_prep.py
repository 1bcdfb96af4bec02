"""Rows per second of the dataset step against the tutorial's download_dataset.py, side by side.

    .venv/bin/python -m bench.dataset_prep [--rows 50000] [--repeats 2]

Both sides read the same synthetic ultrachat-style JSONL file (``prompt``, ``prompt_id``,
``messages``) and write an 80/20 train/test split as JSONL:

- baseline, as the Phi-3 cookbook's script does it: ``load_dataset`` (here the ``json`` builder on
  the local file, with a fresh cache so nothing is reused), ``train_test_split(test_size=0.2)``, then
  ``json.dump(record, f); f.write("\\n")`` per row. No validation.
- ours: ``prepare_dataset(load_rows(path))``: every row validated and token-counted, seeded split,
  ``{"messages": ...}`` rows written in one batch per file, sha256 of each file.

The best of ``--repeats`` runs is reported for each side. Both pick the same test rows (same seed,
same permutation); the benchmark checks that before printing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.chat_dataset import load_rows, prepare_dataset

SEED = 42
_VOCABULARY = """
the a to of and in is it you that for on with as are this be can have your we not or will do an at by from
if how what about more which when there their use one so all would make like time just model data train
answer question water energy city river history music garden system people write
"""
WORDS = _VOCABULARY.split()


def write_synthetic_chats(path: Path, rows: int) -> int:
    """Ultrachat-like rows: 1 to 3 turns, user turns of 10-60 words, answers of 30-150 words."""
    rng = random.Random(SEED)
    lines = []
    for _ in range(rows):
        messages = []
        for _turn in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(10, 60)))})
            answer = " ".join(rng.choices(WORDS, k=rng.randint(30, 150)))
            messages.append({"role": "assistant", "content": answer})
        prompt = messages[0]["content"]
        prompt_id = hashlib.sha256(prompt.encode()).hexdigest()
        lines.append(json.dumps({"prompt": prompt, "prompt_id": prompt_id, "messages": messages}))
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(data)
    return len(data)


def run_baseline(source: Path, work: Path) -> Path:
    import datasets

    dataset = datasets.load_dataset(
        "json", data_files=str(source), split="train", cache_dir=str(work / "cache")
    )
    split = dataset.train_test_split(test_size=0.2, seed=SEED)
    for name in ("train", "test"):
        with (work / f"{name}.jsonl").open("w", encoding="utf-8") as file:
            for record in split[name]:
                json.dump(record, file)
                file.write("\n")
    return work / "test.jsonl"


def run_ours(source: Path, work: Path) -> Path:
    report = prepare_dataset(load_rows(source), out_dir=work, test_size=0.2, seed=SEED)
    if report.rows_invalid or report.test_file is None:
        raise SystemExit(f"the synthetic rows did not all validate: {report.problem_counts}")
    return Path(report.test_file.path)


def timed(step: Callable[[Path, Path], Path], source: Path, work: Path) -> tuple[float, list[object]]:
    """Seconds the step took, and the messages of the test split it wrote."""
    work.mkdir(parents=True)
    started = time.perf_counter()
    test_file = step(source, work)
    seconds = time.perf_counter() - started
    test_messages = [
        json.loads(line)["messages"] for line in test_file.read_text(encoding="utf-8").splitlines()
    ]
    shutil.rmtree(work)
    return seconds, test_messages


def main() -> None:
    parser = argparse.ArgumentParser(description="dataset step vs the tutorial's script, rows/s")
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    best = {"baseline": float("inf"), "ours": float("inf")}
    with tempfile.TemporaryDirectory(prefix="bench-dataset-") as scratch_name:
        scratch = Path(scratch_name)
        source = scratch / "chats.jsonl"
        size = write_synthetic_chats(source, args.rows)
        # Alternate the sides so a noisy neighbour on a shared machine hurts both alike.
        for attempt in range(args.repeats):
            ours_s, ours_test = timed(run_ours, source, scratch / f"ours-{attempt}")
            base_s, base_test = timed(run_baseline, source, scratch / f"baseline-{attempt}")
            if ours_test != base_test:
                raise SystemExit("the two sides picked different test rows; the comparison is void")
            best["ours"] = min(best["ours"], ours_s)
            best["baseline"] = min(best["baseline"], base_s)
    print(f"input: {args.rows} rows, {size / 1e6:.1f} MB JSONL; best of {args.repeats} runs each")
    print(f"{'side':<56} {'seconds':>8} {'rows/s':>10}")
    for side, label in (
        ("baseline", "baseline (load_dataset + train_test_split + json.dump)"),
        ("ours", "ours (prepare_dataset, validation included)"),
    ):
        print(f"{label:<56} {best[side]:>8.2f} {args.rows / best[side]:>10.0f}")
    print(f"speed-up: {best['baseline'] / best['ours']:.2f}x (goal >= 2x)")


if __name__ == "__main__":
    main()
