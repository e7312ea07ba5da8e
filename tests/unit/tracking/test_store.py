"""Where the MLflow store is, and whether a tracking server answers."""

import http.server
import socket
import threading

import pytest

from cvae_pipeline.tracking import store as mlflow_store


def test_repository_root_of_a_dvc_experiment_copy_is_the_main_repository(tmp_path):
    copy = tmp_path / "project" / ".dvc" / "tmp" / "exps" / "tmpab12cd34"
    copy.mkdir(parents=True)
    assert mlflow_store.repository_root(copy) == tmp_path / "project"
    assert mlflow_store.repository_root(tmp_path / "project") == tmp_path / "project"


def test_default_store_is_sqlite_at_the_main_repository(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmp1"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    assert mlflow_store.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert mlflow_store.tracking_uri() == "http://127.0.0.1:5000"


def test_dvc_root_names_the_main_repository(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert mlflow_store.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"


def serve_status(status: int) -> http.server.HTTPServer:
    """A loopback HTTP server that answers every GET with `status`."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(status)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize(("status", "problem"), [(404, None), (401, None), (502, "HTTP 502 Bad Gateway"),
                                                 (503, "HTTP 503 Service Unavailable")])
def test_an_error_status_counts_as_answering_but_a_proxy_without_its_server_does_not(status, problem):
    server = serve_status(status)  # 404: a server without /health; 5xx: a proxy whose server is down
    try:
        assert mlflow_store.unanswered(f"http://127.0.0.1:{server.server_port}") == problem
    finally:
        server.shutdown()


def test_a_closed_port_does_not_answer_and_says_why():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert "refused" in mlflow_store.unanswered(f"http://127.0.0.1:{port}").lower()


def test_stores_that_are_not_servers_are_not_probed():
    assert mlflow_store.unanswered("sqlite:////tmp/x.db") is None
