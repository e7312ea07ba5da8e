"""Writes to a tracking server that goes away: kept in order, sent once each when it answers again."""

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from cvae_pipeline.tracking import outbox as outbox_module
from cvae_pipeline.tracking.outbox import Outbox

URI = "http://127.0.0.1:5999"


class Server:
    """Stands in for the server: whether /health answers, and the writes it holds."""

    def __init__(self):
        self.up = True
        self.held: list[str] = []
        self.refusing = False

    def probe(self, uri, attempts=3):
        return None if self.up else "Connection refused"

    def write(self, what):
        def send():
            if not self.up:
                raise MlflowException(f"API request to {URI} failed with exception Max retries exceeded")
            if self.refusing:
                raise MlflowException("bad request", error_code=INVALID_PARAMETER_VALUE)
            self.held.append(what)
        return send


@pytest.fixture
def server(monkeypatch):
    found = Server()
    monkeypatch.setattr(outbox_module, "unanswered", found.probe)
    return found


def test_writes_while_the_server_is_away_wait_and_arrive_in_order_once_each(server):
    box = Outbox(URI)
    box.send("epoch 1", server.write("epoch 1"))
    server.up = False
    box.send("epoch 2", server.write("epoch 2"))
    box.send("epoch 3", server.write("epoch 3"))
    assert box.away and box.missing == ["epoch 2", "epoch 3"] and server.held == ["epoch 1"]
    server.up = True
    box.send("model", server.write("model"))
    assert server.held == ["epoch 1", "epoch 2", "epoch 3", "model"]
    assert not box.away and box.missing == []
    box.flush()
    assert server.held == ["epoch 1", "epoch 2", "epoch 3", "model"]


def test_a_request_the_server_refuses_is_raised_not_kept(server):
    box = Outbox(URI)
    server.refusing = True
    with pytest.raises(MlflowException, match="bad request"):
        box.send("params", server.write("params"))
    assert box.missing == [] and not box.away


def test_a_failure_while_the_server_answers_is_tried_once_more_then_raised(server):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:  # MLflow's retries gave up just as the server came back
            raise MlflowException("API request failed with exception Connection refused")

    box = Outbox(URI)
    box.send("epoch 1", flaky)
    assert calls == [1, 1] and box.missing == []

    def failing():
        raise MlflowException("500 from a server that answers its health check")

    with pytest.raises(MlflowException, match="500"):
        box.send("epoch 2", failing)
    assert box.missing == []


def test_a_store_that_is_not_a_server_never_keeps_a_write(server):
    box = Outbox("sqlite:////tmp/x.db")
    server.up = False
    with pytest.raises(MlflowException):
        box.send("epoch 1", server.write("epoch 1"))
    assert box.missing == []
