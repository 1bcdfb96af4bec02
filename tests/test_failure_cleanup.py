"""What a failed run's cleanup (``cleanup_on_failure``) is given and how it treats what is not there.

The orchestrator's loop over deletions still under way is proven against the fake Azure in
tests/test_azure_resilience.py; the local end-to-end cleanup in tests/test_pipeline_e2e.py.
"""

from __future__ import annotations

from activities.steps import cleanup_run
from backends.local.backend import LocalBackend
from backends.protocol import ResourceRef
from orchestrators.finetune import cleanup_refs
from settings import AppSettings

NAMES = {"job": "phi3ft-r-1a2b3c", "endpoint": "phi3ft-1a2b3c", "connection": "phi3-endpoint"}


def test_a_failed_create_step_adds_what_it_may_have_made_under_the_runs_name():
    data = ResourceRef(kind="data", name="phi3ft-train-1a2b3c", version="1")

    assert cleanup_refs([data], "endpoint", NAMES) == [
        data.model_dump(),
        ResourceRef(kind="endpoint", name="phi3ft-1a2b3c").model_dump(),
    ]
    assert cleanup_refs([data], "submit_finetune", NAMES)[-1] == {
        "kind": "job",
        "name": "phi3ft-r-1a2b3c",
        "version": None,
        "parent": None,
    }


def test_other_failed_steps_add_nothing_and_nothing_is_listed_twice():
    endpoint = ResourceRef(kind="endpoint", name="phi3ft-1a2b3c")

    assert cleanup_refs([endpoint], "flow_smoke", NAMES) == [endpoint.model_dump()]
    assert cleanup_refs([endpoint], "endpoint", NAMES) == [endpoint.model_dump()]
    # the shared connection is never added on a guess: another run may be using it
    assert cleanup_refs([], "promptflow_connection", NAMES) == []


def test_cleanup_skips_what_was_never_made(tmp_path):
    backend = LocalBackend(AppSettings(PHI3_STATE_DIR=str(tmp_path)), restart_endpoints=False)
    refs = [{"kind": "job", "name": "phi3ft-never"}, {"kind": "endpoint", "name": "phi3ft-never"}]

    assert cleanup_run({"created": refs}, backend) == {"actions": [], "pending": []}
