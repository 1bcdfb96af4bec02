"""The Function App: HTTP API, Durable orchestrations and activities of the Phi-3 fine-tune pipeline.

Runs unchanged under Azure Functions (``func start`` / a deployed app) and under ``python -m devhost``.
"""

import azure.durable_functions as df
import azure.functions as func

app = df.DFApp(http_auth_level=func.AuthLevel.FUNCTION)


@app.route(route="health", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def health(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse('{"status": "ok"}', mimetype="application/json")
