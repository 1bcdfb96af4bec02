"""The run config is validated before anything starts; every problem is reported by its field path."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.config import PRESETS, InvalidRunConfig, parse_run_config
from settings import PROJECT_ROOT, AppSettings


@pytest.fixture
def local():
    return AppSettings(PHI3_BACKEND="local")


@pytest.fixture
def azure():
    return AppSettings(
        PHI3_BACKEND="azure", AZURE_SUBSCRIPTION_ID="sub", AZURE_RESOURCE_GROUP="rg", AZURE_LOCATION="eastus2"
    )


def problems(body, settings) -> dict[str, str]:
    with pytest.raises(InvalidRunConfig) as info:
        parse_run_config(body, settings)
    return {p.field: p.message for p in info.value.problems}


SMOKE = {"preset": "smoke"}
SMOKE_AZURE = {"dataset": {"hub_id": None, "files": ["sample_data/support_chats.jsonl"]}}

BAD_CONFIGS = [
    ({**SMOKE, "colour": "blue"}, "colour", "unknown field"),
    ({**SMOKE, "hyperparameters": {"learning_rate": 0}}, "hyperparameters.learning_rate", "greater than 0"),
    (
        {**SMOKE, "hyperparameters": {"learning_rate": "fast"}},
        "hyperparameters.learning_rate",
        "valid number",
    ),
    (
        {**SMOKE, "hyperparameters": {"lr_scheduler_type": "exponential"}},
        "hyperparameters.lr_scheduler_type",
        "'linear'",
    ),
    (
        {**SMOKE, "hyperparameters": {"num_train_epochs": 0}},
        "hyperparameters.num_train_epochs",
        "greater than or equal to 1",
    ),
    (
        {**SMOKE, "hyperparameters": {"per_device_train_batch_size": -4}},
        "hyperparameters.per_device_train_batch_size",
        "greater than or equal to 1",
    ),
    ({**SMOKE, "hyperparameters": {"lora_dropout": 1.5}}, "hyperparameters.lora_dropout", "less than 1"),
    (
        {**SMOKE, "hyperparameters": {"lora_r": 64, "lora_alpha": 16}},
        "hyperparameters.lora_alpha",
        "at least lora_r",
    ),
    (
        {**SMOKE, "hyperparameters": {"batch_size_multiplier": 2}},
        "hyperparameters.batch_size_multiplier",
        "only serverless",
    ),
    ({**SMOKE, "hyperparameters": {"dropout": 0.1}}, "hyperparameters.dropout", "unknown field"),
    ({**SMOKE, "dataset": {"test_size": 1.2}}, "dataset.test_size", "less than 1"),
    ({**SMOKE, "dataset": {"test_size": 0}}, "dataset.test_size", "greater than 0"),
    ({**SMOKE, "dataset": {"files": []}}, "dataset.files", "at least 1"),
    ({**SMOKE, "dataset": {"files": ["nope/missing.jsonl"]}}, "dataset.files[0]", "no such file"),
    ({**SMOKE, "dataset": {"files": ["pyproject.toml"]}}, "dataset.files[0]", ".jsonl or .parquet"),
    ({**SMOKE, "dataset": {"files": ["bench"]}}, "dataset.files[0]", "the folder bench holds neither"),
    ({**SMOKE, "dataset": {"files": None, "hub_id": None}}, "dataset", "either dataset.hub_id"),
    ({**SMOKE, "dataset": {"max_tokens": 8}}, "dataset.max_tokens", "greater than or equal to 32"),
    (
        {**SMOKE, "compute": {"min_instances": 2, "max_instances": 1}},
        "compute.min_instances",
        "must not exceed",
    ),
    ({**SMOKE, "compute": {"name": "x"}}, "compute.name", "pattern"),
    ({**SMOKE, "compute": {"device": "tpu"}}, "compute.device", "'auto'"),
    (
        {**SMOKE, "deployment": {"instance_count": 0}},
        "deployment.instance_count",
        "greater than or equal to 1",
    ),
    ({**SMOKE, "deployment": {"endpoint_name": "9lives"}}, "deployment.endpoint_name", "pattern"),
    ({**SMOKE, "deployment": {"endpoint_name": "ends-with-"}}, "deployment.endpoint_name", "pattern"),
    ({**SMOKE, "deployment": {"ttl_hours": -1}}, "deployment.ttl_hours", "greater than 0"),
    (
        {**SMOKE, "deployment": {"request_timeout_ms": 500000}},
        "deployment.request_timeout_ms",
        "less than or equal",
    ),
    (
        {**SMOKE, "polling": {"initial_seconds": 60, "max_seconds": 10}},
        "polling.initial_seconds",
        "must not exceed",
    ),
    ({**SMOKE, "mode": "serverless"}, "mode", "managed_compute with the local backend"),
    ({**SMOKE, "mode": "batch"}, "mode", "'managed_compute'"),
    ({**SMOKE, "run_id": "has spaces"}, "run_id", "pattern"),
    ({**SMOKE, "model": {"name": "gpt-5"}}, "model.name", "not a local base model"),
    (
        {"model": {"name": "/no/such/checkpoint"}, "dataset": {"files": ["sample_data/support_chats.jsonl"]}},
        "model.name",
        "no config.json",
    ),
    ({}, "model.name", "PHI3_LOCAL_CHECKPOINT_DIR"),
    ({**SMOKE, "evaluation": {"sample_size": 0}}, "evaluation.sample_size", "greater than or equal to 1"),
    ({**SMOKE, "promptflow": {"connection_name": "has space"}}, "promptflow.connection_name", "pattern"),
    # Names Azure refuses are refused here, not after the fine-tune and the deployment.
    ({**SMOKE, "promptflow": {"connection_name": "ab"}}, "promptflow.connection_name", "pattern"),
    ({**SMOKE, "promptflow": {"connection_name": "_x1"}}, "promptflow.connection_name", "pattern"),
    ({**SMOKE, "promptflow": {"connection_name": "c" * 34}}, "promptflow.connection_name", "pattern"),
    ({**SMOKE, "compute": {"name": "gpu-"}}, "compute.name", "pattern"),
    ({**SMOKE, "compute": {"name": "g" * 17}}, "compute.name", "pattern"),
    ({**SMOKE, "azure": {"identity_name": "my.identity"}}, "azure.identity_name", "pattern"),
    ({**SMOKE, "azure": {"identity_name": "-id"}}, "azure.identity_name", "pattern"),
    ({**SMOKE, "azure": {"workspace": "my.ws"}}, "azure.workspace", "pattern"),
    ({**SMOKE, "deployment": {"deployment_name": "Base"}}, "deployment.deployment_name", "base-model"),
    ({**SMOKE, "promptflow": {"flow": "flows/nope"}}, "promptflow.flow", "no flow.dag.yaml"),
    # Names the system refuses (longer than a file name may be) are no file, not a crash.
    ({**SMOKE, "promptflow": {"flow": "f" * 5000}}, "promptflow.flow", "(5000 characters) is not a Prompt"),
    ({**SMOKE, "dataset": {"files": ["d" * 5000 + ".jsonl"]}}, "dataset.files[0]", "no such file"),
    ({**SMOKE, "model": {"name": "/" + "m" * 5000}}, "model.name", "no config.json"),
    # .json is not a format the dataset reader takes: refused before the run, not at prepare_dataset.
    ({**SMOKE, "dataset": {"files": ["sample_data/support_facts.json"]}}, "dataset.files[0]", ".jsonl or"),
    ({**SMOKE, "hyperparameters": {"seed": 2**64}}, "hyperparameters.seed", "less than or equal to 4294967"),
    ({**SMOKE, "dataset": {"seed": -1}}, "dataset.seed", "greater than or equal to 0"),
    (
        {**SMOKE, "hyperparameters": {"lr_scheduler_type": "polynomial"}},
        "hyperparameters.lr_scheduler_type",
        "not supported by the local trainer",
    ),
    ({**SMOKE, "hyperparameters": {"weight_decay": float("nan")}}, "hyperparameters.weight_decay", "finite"),
    ({**SMOKE, "polling": {"backoff": float("inf")}}, "polling.backoff", "finite number"),
    ({"preset": ["smoke"]}, "preset", "must be a preset's name (a string), got list"),
    ({"preset": {"smoke": 1}}, "preset", "got dict"),
]


@pytest.mark.parametrize(
    ("body", "field", "fragment"), BAD_CONFIGS, ids=[c[1] + "-" + str(i) for i, c in enumerate(BAD_CONFIGS)]
)
def test_bad_config_is_reported_at_its_field_path(body, field, fragment, local):
    found = problems(body, local)
    assert field in found, found
    assert fragment in found[field]


def test_every_problem_is_listed_at_once(local):
    found = problems(
        {**SMOKE, "hyperparameters": {"learning_rate": -1, "num_train_epochs": 0}, "extra": 1}, local
    )
    assert {"hyperparameters.learning_rate", "hyperparameters.num_train_epochs", "extra"} <= set(found)


def test_schema_and_semantic_problems_are_reported_together(local):
    found = problems({"hyperparameters": {"learning_rate": -1}}, local)
    assert {"hyperparameters.learning_rate", "model.name"} <= set(found)


def test_body_must_be_an_object(local):
    assert "(body)" in problems([1, 2], local)


def test_a_bad_workspace_setting_is_refused_naming_the_setting():
    settings = AppSettings(
        PHI3_BACKEND="azure",
        AZURE_SUBSCRIPTION_ID="sub",
        AZURE_RESOURCE_GROUP="rg",
        AZURE_LOCATION="eastus2",
        AZURE_ML_WORKSPACE="team.workspace",
    )
    found = problems(SMOKE_AZURE, settings)
    assert "AZURE_ML_WORKSPACE 'team.workspace' is not an Azure ML workspace name" in found["azure.workspace"]


@pytest.mark.parametrize(
    ("mode", "workspace", "field", "derived"),
    [
        ("serverless", "w" * 30, "azure.workspace", "w" * 30 + "-hub"),  # made by the workspace step
        (
            "managed_compute",
            "w" * 26,
            "promptflow.project",
            "w" * 26 + "-project",
        ),  # made to publish the flow
    ],
)
def test_derived_foundry_names_too_long_for_azure_are_refused_before_the_run(
    azure, mode, workspace, field, derived
):
    settings = azure.model_copy(update={"azure_workspace": workspace})
    found = problems({**SMOKE_AZURE, "mode": mode, "azure": {"workspace": workspace}}, settings)

    assert f"name '{derived}' (derived from the workspace '{workspace}') is longer than 33" in found[field]


def test_a_short_enough_workspace_passes_in_both_modes(azure):
    settings = azure.model_copy(update={"azure_workspace": "w" * 25})
    for mode in ("serverless", "managed_compute"):
        parse_run_config({**SMOKE_AZURE, "mode": mode}, settings)


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("AZURE_SETUP_WAIT_SECONDS", 1800),  # a step waits several times within the 10-minute timeout
        ("AZURE_HTTP_TIMEOUT_SECONDS", 600),  # azure-core tries a call 4 times
        ("HTTP_BACKEND_WAIT_SECONDS", 240),  # an HTTP answer must come within Azure's 230 s
        ("EVALUATION_CALL_BUDGET_S", 420),  # a last question may take 180 s: past the 10 minutes
        ("DATASET_CALL_BUDGET_S", 600),  # a call past it still ends its chunk and writes the split
        ("BOT_MODEL_TIMEOUT_S", 600),
        ("BOT_ACK_AFTER_S", 300),  # an HTTP answer must come within Azure's 230 s
    ],
)
def test_waits_past_the_hosts_limits_are_refused_naming_the_setting(setting, value):
    with pytest.raises(ValidationError, match=setting):
        AppSettings(**{setting: value})


def test_schedules_only_azure_runs_are_taken_there(azure):
    cfg = parse_run_config({"hyperparameters": {"lr_scheduler_type": "polynomial"}}, azure)
    assert cfg.hyperparameters.lr_scheduler_type == "polynomial"


def test_unknown_preset_is_named(local):
    assert "unknown preset 'fast'" in problems({"preset": "fast"}, local)["preset"]


def test_defaults_follow_the_tutorial(azure):
    cfg = parse_run_config({}, azure)
    assert cfg.model.name == "Phi-3-mini-4k-instruct"
    assert (cfg.dataset.hub_id, cfg.dataset.split, cfg.dataset.test_size) == (
        "HuggingFaceH4/ultrachat_200k",
        "train_sft[:1%]",
        0.2,
    )
    assert (
        cfg.compute.size,
        cfg.compute.min_instances,
        cfg.compute.max_instances,
        cfg.compute.idle_time_before_scale_down,
    ) == ("Standard_NC24ads_A100_v4", 0, 1, 120)
    assert cfg.deployment.instance_count == 1
    assert cfg.deployment.instance_type != "Standard_NC6s_v3"  # retired 2025-09-30


def test_preset_values_are_overridden_by_the_body(local):
    cfg = parse_run_config({"preset": "smoke", "hyperparameters": {"num_train_epochs": 2}}, local)
    assert cfg.hyperparameters.num_train_epochs == 2
    assert cfg.hyperparameters.learning_rate == PRESETS["smoke"]["hyperparameters"]["learning_rate"]
    assert cfg.model.name == "tiny-phi3"


def test_serverless_outside_east_us_2_is_refused(azure):
    found = problems({"mode": "serverless", "azure": {"location": "westeurope"}}, azure)
    assert "only in East US 2" in found["azure.location"]


def test_azure_backend_needs_a_subscription():
    found = problems({}, AppSettings(PHI3_BACKEND="azure"))
    assert "AZURE_SUBSCRIPTION_ID" in found["azure.subscription_id"]


def test_local_phi3_checkpoint_setting_is_accepted(local, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    settings = AppSettings(PHI3_BACKEND="local", PHI3_LOCAL_CHECKPOINT_DIR=str(tmp_path))
    assert parse_run_config({"dataset": {"files": ["sample_data/support_chats.jsonl"]}}, settings).model.name


def test_rows_are_limited_by_the_models_context_when_it_is_smaller(tmp_path, azure):
    from pipeline.config import context_window, row_token_limit

    assert context_window("Phi-3-mini-4k-instruct") == 4096
    assert context_window("Phi-3-mini-128k-instruct") == 131072
    assert context_window("tiny-phi3") is None
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text('{"max_position_embeddings": 2048}')
    assert context_window(str(checkpoint)) == 2048

    long_rows = parse_run_config({"dataset": {"max_tokens": 8000}}, azure)
    assert row_token_limit(long_rows) == (4096, "the context of Phi-3-mini-4k-instruct")
    assert row_token_limit(parse_run_config({"dataset": {"max_tokens": 1000}}, azure)) == (
        1000,
        "dataset.max_tokens",
    )
    local = parse_run_config({"model": {"name": str(checkpoint)}}, AppSettings(PHI3_BACKEND="local"))
    assert row_token_limit(local)[0] == 2048


def test_dataset_files_may_name_folders_the_reader_takes(local, tmp_path):
    # A folder of JSONL/Parquet shards, or one saved with datasets' save_to_disk (what the offline
    # advice for a hub dataset suggests), is read as its files are.
    import datasets

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "part-0.jsonl").write_text((PROJECT_ROOT / "sample_data" / "support_chats.jsonl").read_text())
    saved = tmp_path / "saved"
    datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "hi"}]}]).save_to_disk(str(saved))

    cfg = parse_run_config({**SMOKE, "dataset": {"files": [str(shards), str(saved)]}}, local)

    assert cfg.dataset.files == [str(shards), str(saved)]


def test_a_read_only_project_folder_keeps_the_state_and_models_in_the_temp_folder(monkeypatch, tmp_path):
    # A Function App runs from its deployment package (Flex Consumption always): wwwroot takes no writes,
    # and os.access says so for a read-only mount; the instance's temp folder does.
    import os
    import tempfile

    for name in ("PHI3_STATE_DIR", "PHI3_MODELS_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert AppSettings().state_dir == PROJECT_ROOT / ".phi3"  # a writable checkout keeps them beside it

    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: False if path == PROJECT_ROOT else real_access(path, mode)
    )
    settings = AppSettings()

    assert (settings.state_dir, settings.models_dir) == (
        tmp_path / "phi3" / "phi3",
        tmp_path / "phi3" / "models",
    )
    assert AppSettings(PHI3_STATE_DIR="/data/phi3").state_dir == Path("/data/phi3")  # a setting still wins


def test_hugging_face_caches_go_to_the_state_folder_where_the_home_folder_is_read_only(tmp_path):
    # datasets writes its modules cache under HF_HOME even when streaming a hub dataset, and reads the
    # variable once, on import: the app sets it when it loads, where the default cannot be written.
    import os
    import subprocess
    import sys

    home, state = tmp_path / "home", tmp_path / "state"
    home.mkdir()
    probe = f"""
import os
real_access = os.access
os.access = lambda path, mode: False if str(path).startswith({str(home)!r}) else real_access(path, mode)
import function_app
import datasets.config
print(datasets.config.HF_MODULES_CACHE)
"""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XDG_"))}

    def modules_cache(**settings: str) -> Path:
        done = subprocess.run(
            [sys.executable, "-c", probe],
            env={**environment, "HOME": str(home), "PHI3_STATE_DIR": str(state), **settings},
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        return Path(done.stdout.strip().splitlines()[-1])

    assert modules_cache() == state / "huggingface" / "modules"
    assert modules_cache(HF_HOME=str(tmp_path / "mine")) == tmp_path / "mine" / "modules"


def test_a_writable_hugging_face_home_is_left_as_it_is(tmp_path):
    from settings import writable_hf_home

    environ = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    settings = AppSettings(PHI3_STATE_DIR=str(tmp_path / "state"))

    assert writable_hf_home(settings, environ) is None and "HF_HOME" not in environ


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"run_id": "x" * 100_000}, "run_id"),
        ({"x" * 100_000: 1}, "x" * 100 + "… (100000 characters)"),
        ({"model": {"name": "/" + "y" * 100_000}}, "model.name"),
        ({"dataset": {"files": ["z.jsonl"] * 100_000}}, "dataset.files"),
    ],
)
def test_a_huge_value_is_refused_in_a_few_hundred_characters_that_still_name_the_field(local, body, field):
    with pytest.raises(InvalidRunConfig) as refused:
        parse_run_config(body, local)

    assert refused.value.problems[0].field == field and len(str(refused.value)) < 1000


def test_hundreds_of_problems_are_answered_with_the_first_fifty_and_how_many_more(local):
    with pytest.raises(InvalidRunConfig) as refused:
        parse_run_config({**SMOKE, **{f"unknown_{i}": 1 for i in range(200)}}, local)

    problems = refused.value.problems
    assert [p.field for p in problems[:50]] == [f"unknown_{i}" for i in range(50)]
    assert problems[50].message == "150 more problems not shown" and len(problems) == 51
