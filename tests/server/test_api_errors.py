"""Without a server: a validation error names the field as the client wrote it, and a bug is an
OpenAI-shaped 500, never Starlette's plain text."""

import shutil
import tempfile

import pytest
from fastapi.testclient import TestClient
from minisgl_jax.server import ipc
from minisgl_jax.server.api import APIConfig, build_app
from minisgl_jax.server.errors import body_path
from minisgl_jax.server.client import EngineClient
from minisgl_jax.server.metrics import ServerMetrics

BODY = {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}], "prompt": {"a": 1}}


@pytest.mark.parametrize("loc,kind,path", [
    (("body", "messages", 0, "content", "list[TextPart]", 0, "text"), "value_error", "messages.0.content.0.text"),
    (("body", "prompt", "str"), "string_type", "prompt"),  # the last union member tried is not a field
    (("body", "messages", 0, "name"), "missing", "messages.0.name"),
    (("body", 17), "json_invalid", None),
    (("path", "rid"), "string_type", "path.rid"),
])
def test_body_path_names_the_field_as_the_client_wrote_it(loc, kind, path):
    assert body_path({"loc": loc, "type": kind}, BODY) == path


def test_a_bug_is_an_openai_shaped_500():
    run_dir = tempfile.mkdtemp(prefix="minisgl-")  # short: ipc socket paths are limited to ~100 bytes
    client = EngineClient(ipc.RunDir(run_dir), ServerMetrics())
    try:
        app = build_app(client, APIConfig(served_model_name="m"))

        @app.get("/bug")
        async def bug() -> None:
            raise RuntimeError("a bug")

        response = TestClient(app, raise_server_exceptions=False).get("/bug")
        assert response.status_code == 500
        assert response.json()["error"] == {"message": "internal server error (RuntimeError)", "type": "server_error",
                                             "param": None, "code": 500}
        assert 'minisgl_request_errors_total{status="500"} 1.0' in client.metrics.render().decode()
    finally:
        client.inbox.close()
        client.to_tokenizer.close()
        shutil.rmtree(run_dir)
