"""Integrate step ``publish_flow``: the chat flow in an Azure AI Foundry project (the tutorial's scenario 3).

Azure: the hub and project, the custom connection in the project, the flow uploaded so a person can
open it in the portal and chat (after starting a compute session there, which only the cloud can do).
Local: skipped with where to open the flow instead. The step's outputs carry names and the portal
link, never the endpoint key.
"""

from __future__ import annotations

from pathlib import Path

from activities.steps import StepInput
from backends.protocol import MLBackend
from pipeline.steps import StepResult


def flow_display_name(inp: StepInput) -> str:
    """The name the flow shows in the portal: the flow folder and the run, so each run's is findable."""
    return f"{Path(inp.config.promptflow.flow).name}-{inp.run_id}"


def publish_flow(inp: StepInput, backend: MLBackend) -> StepResult:
    result = backend.publish_flow(
        inp.names["connection"], inp.names["endpoint"], flow_display_name(inp), inp.config
    )
    return StepResult(
        summary=result.summary, skipped=result.skipped, outputs=result.details, created=result.created
    )
