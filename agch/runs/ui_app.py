"""`mlflow ui --app-name agch` (or `mlflow server --app-name agch`): MLflow's own server and UI, with experiments
opening on their runs table.

MLflow 3.17 shows an experiment either with its GenAI pages (overview, traces) or with its model-training pages
(runs table) by one switch per browser, the sidebar's "GenAI | Model training", kept in the browser's localStorage
and GenAI until the user picks. It does not read the experiment tag `mlflow.experimentKind` for that. So in a
browser that never picked, `/#/experiments/ID` (what the home page links to) opens on the GenAI overview of an
experiment that has no traces. This app is MLflow's app with one line added to the UI's page: a browser that has
not picked starts on "Model training". A browser that picked keeps its choice; nothing else changes. The links the
project prints carry `workflowType=machine_learning` in their URL and work with a plain `mlflow ui` too.

Registered as the `mlflow.app` entry point `agch` (pyproject.toml), which is how MLflow's `--app-name` finds apps.
"""

from __future__ import annotations

import json

from flask import Response, request
from mlflow.server import app as flask_app
from mlflow.server import serve as serve_page
from mlflow.server.fastapi_app import app  # noqa: F401  (what the server serves: MLflow's ASGI app around flask_app)

WORKFLOW_KEY = "mlflow.workflowType_v1"
"""The localStorage entry in which MLflow 3.17's UI keeps the browser's GenAI / Model training choice."""
DEFAULT_WORKFLOW = "machine_learning"
SCRIPT = (f"<script>if(localStorage.getItem({json.dumps(WORKFLOW_KEY)})===null)"
          f"localStorage.setItem({json.dumps(WORKFLOW_KEY)},{json.dumps(json.dumps(DEFAULT_WORKFLOW))})</script>")


@flask_app.after_request
def _model_training_by_default(response: Response) -> Response:
    """The UI's page (MLflow's index.html) with SCRIPT first in its head; every other response as it was."""
    if flask_app.view_functions.get(request.endpoint) is not serve_page or response.status_code != 200:
        return response
    response.direct_passthrough = False  # a file response: read its body to change it
    page = response.get_data(as_text=True)
    if "<head>" in page and SCRIPT not in page:
        response.set_data(page.replace("<head>", "<head>" + SCRIPT, 1))
        response.headers.pop("ETag", None)  # the file's tag no longer describes this body
    return response
