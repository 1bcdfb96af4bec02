"""The pipeline's real monitor sub-orchestration, driven by a scripted status activity."""

import time

import azure.durable_functions as df
import azure.functions as func

from orchestrators.monitor import bp as monitor_bp

app = df.DFApp(http_auth_level=func.AuthLevel.ANONYMOUS)
app.register_functions(monitor_bp)
_polls: dict[str, int] = {}


@app.activity_trigger(input_name="args")
def scripted_status(args: dict) -> dict:
    """Reports Running until the poll count reaches ``done_after``; then the final status."""
    key = args["key"]
    _polls[key] = _polls.get(key, 0) + 1
    n = _polls[key]
    if n >= args["done_after"]:
        return {
            "done": True,
            "ok": args.get("final", "Completed") == "Completed",
            "status": args.get("final", "Completed"),
            "detail": {"poll": n} | ({"error": args["error"]} if "error" in args else {}),
        }
    return {"done": False, "status": "Running", "detail": {"poll": n}}


@app.activity_trigger(input_name="seconds")
def sleepy(seconds: float) -> str:
    time.sleep(seconds)
    return "woke up"


@app.orchestration_trigger(context_name="context")
def calls_sleepy(context: df.DurableOrchestrationContext):
    try:
        return (yield context.call_activity("sleepy", context.get_input()))
    except Exception as exc:
        return f"failed: {exc}"
