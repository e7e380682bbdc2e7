"""`mlflow ui --app-name agch` (or `mlflow server --app-name agch`): MLflow's own server and UI, with experiments
opening on their runs table.

MLflow 3.17 shows an experiment either with its GenAI pages (overview, traces) or with its model-training pages
(runs table) by one switch per browser, the sidebar's "GenAI | Model training", kept in the browser's localStorage
and GenAI until the user picks. It does not read the experiment tag `mlflow.experimentKind` for that. So in a
browser that never picked, `/#/experiments/ID` (what the home page links to) opens on the GenAI overview of an
experiment that has no traces; and on a local server the UI opens its assistant chat panel once, on a browser's first
page, taking a quarter of the window from the runs table's columns. This app is MLflow's app with one script added
to the UI's page: a browser that has not picked starts on "Model training", and one that never had the assistant
opened for it does not get it opened (its button stays, bottom right). A browser's own choices stay; nothing else
changes. The links the
project prints carry `workflowType=machine_learning` in their URL and work with a plain `mlflow ui` too.

Registered as the `mlflow.app` entry point `agch` (pyproject.toml), which is how MLflow's `--app-name` finds apps.
"""

from __future__ import annotations

import json

from flask import Response, request
from mlflow.server import app as flask_app
from mlflow.server import serve as serve_page
from mlflow.server.fastapi_app import app  # noqa: F401  (what the server serves: MLflow's ASGI app around flask_app)

DEFAULTS = {
    "mlflow.workflowType_v1": "machine_learning",  # the GenAI / Model training switch
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": True,  # "the assistant was opened once already"
}
"""localStorage entries of MLflow 3.17's UI (its key `NAME_vVERSION`, a JSON value) set where a browser has none."""
SCRIPT = "<script>" + "".join(
    f"if(localStorage.getItem({json.dumps(key)})===null)"
    f"localStorage.setItem({json.dumps(key)},{json.dumps(json.dumps(value))});" for key, value in DEFAULTS.items()
) + "</script>"


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
