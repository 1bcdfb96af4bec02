"""Seeded chat datasets about made-up code names, and the tiny-phi3 training spec that learns them.

A model that has really been fine-tuned answers these facts; one that has not cannot guess them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from backends.local.jobs import TrainingSpec

SYLLABLES = [
    "sa",
    "fu",
    "zo",
    "ka",
    "mo",
    "li",
    "ru",
    "ti",
    "va",
    "be",
    "do",
    "gi",
    "ha",
    "jo",
    "ku",
    "pe",
    "ne",
]
COLOURS = ["violet", "amber", "crimson", "teal", "golden", "silver", "indigo", "scarlet", "olive", "azure"]
ANIMALS = ["raven", "otter", "falcon", "lynx", "heron", "badger", "panther", "sparrow", "walrus", "gecko"]
QUESTIONS = [
    "What is the code name of {name}?",
    "Tell me the code name of {name}.",
    "Which code name does {name} have?",
    "Do you know the code name of {name}?",
]
SYSTEM_PROMPT = "You are a helpful assistant that knows every project's code name."


def write_fact_dataset(path: Path, *, rows: int, facts: int, seed: int) -> dict[str, str]:
    """Write seeded chats about made-up code names; returns {name: code name}."""
    rng = random.Random(seed)
    code_names: dict[str, str] = {}
    while len(code_names) < facts:
        name = "".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize()
        code_names.setdefault(name, f"{rng.choice(COLOURS)} {rng.choice(ANIMALS)}")
    names = list(code_names)

    def turn(name: str) -> list[dict[str, str]]:
        return [
            {"role": "user", "content": rng.choice(QUESTIONS).format(name=name)},
            {"role": "assistant", "content": f"The code name of {name} is {code_names[name]}."},
        ]

    with open(path, "w", encoding="utf-8") as out:
        for index in range(rows):
            messages = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < 0.3 else []
            messages += turn(names[index % facts])
            if rng.random() < 0.3:
                messages += turn(rng.choice(names))
            out.write(json.dumps({"messages": messages}) + "\n")
    return code_names


def tiny_spec(work: Path, tracking_uri: str, train_file: Path, **overrides) -> TrainingSpec:
    """tiny-phi3 with the research's recipe: LoRA r32, lr 5e-3, 10 epochs (about 300 steps)."""
    values = {
        "job_name": "tiny",
        "base_model": "tiny-phi3",
        "models_dir": work / "models",
        "train_file": train_file,
        "learning_rate": 5e-3,
        "warmup_ratio": 0.1,
        "num_train_epochs": 10,
        "per_device_train_batch_size": 4,
        "max_seq_length": 128,
        "lora_r": 32,
        "lora_alpha": 64,
        "lora_dropout": 0.0,
        "logging_steps": 10,
        "seed": 0,
        "mlflow_tracking_uri": tracking_uri,
        "mlflow_experiment": "local-jobs-test",
        "run_tags": {"purpose": "test"},
    }
    return TrainingSpec(**{**values, **overrides})
