"""Fixtures shared by the unit tests."""
import os
import queue
import socket
import sys
import types

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from guestlink.agent.config import Config  # noqa: E402
from guestlink.agent.transfers import FileOps  # noqa: E402
from test_host_fakeagent import short_tmp  # noqa: E402


class StubAgent:
    """What FileOps needs of the agent server; records what it would send."""

    def __init__(self, config):
        self.config = config
        self.session = types.SimpleNamespace(transfers={})
        self.results = queue.Queue()
        self.events = []
        self.replies = []

    def post_result(self, token, value):
        self.results.put(value)

    def send_event(self, rid, event):
        self.events.append(event)

    def reply(self, rid, result):
        self.replies.append(("ok", result))

    def error(self, rid, code, message, details=None):
        self.replies.append(("error", code, message, details))


@pytest.fixture
def bed(tmp_path):
    """A FileOps on a stub agent whose data port is a unix socket (``server``: the host's end)
    and whose write root is ``target``."""
    d = short_tmp(tmp_path)
    target = os.path.join(d, "files")
    os.mkdir(target)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(os.path.join(d, "data.sock"))
    server.listen(1)
    config = Config()
    config.data_device = "unix:" + os.path.join(d, "data.sock")
    config.write_roots = [target]
    agent = StubAgent(config)
    yield types.SimpleNamespace(target=target, server=server, agent=agent, files=FileOps(agent))
    server.close()
