"""Agent pieces in isolation: config, byte queue, port lookup, and the server's no-host backoff
(run in-process against a fake virtio port whose "host connected" state the test controls)."""
import os
import socket
import threading
import time

import pytest

from guestlink.agent import sysinfo
from guestlink.agent.config import Config, ConfigError, load_config, parse_size
from guestlink.agent.loop import ByteQueue, Timers
from guestlink.agent.ports import Port, PortAbsent, VirtioPort
from guestlink.agent.server import Agent
from guestlink.protocol import Frame, FrameDecoder, FrameType
from guestlink.protocol import messages as m


# == config ======================================================================================

def test_defaults_when_the_default_file_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr("guestlink.agent.config.DEFAULT_CONFIG_PATH", str(tmp_path / "none.conf"))
    c = load_config(None)
    assert (c.ctl_name, c.data_name, c.socket) == ("org.guestlink.ctl", "org.guestlink.data",
                                                   "/run/guestlink/agent.sock")
    assert (c.allow, c.deny, c.max_concurrent, c.max_output, c.max_timeout) == (["*"], [], 32, 16 << 20, 0)
    assert c.handlers_dir == "/etc/guestlink/handlers.d" and c.log_level == "info"


def test_file_then_flags_override(tmp_path):
    conf = tmp_path / "a.conf"
    conf.write_text("[agent]\nctl_name = my.ctl\nlog_level = DEBUG\n[policy]\nallow = ping info,\n exec\n"
                    "deny = ex*\n[exec]\nmax_output = 512K\nmax_timeout = 60\nmax_concurrent = 4\n")
    c = load_config(str(conf), {"ctl_name": None, "deny": "", "log_level": "warning"})
    assert c.ctl_name == "my.ctl" and c.log_level == "warning"
    assert c.allow == ["ping", "info", "exec"] and c.deny == []
    assert (c.max_output, c.max_timeout, c.max_concurrent) == (512 << 10, 60.0, 4)


@pytest.mark.parametrize("text, fragment", [
    ("[agent]\nbogus = 1\n", "unknown key 'bogus'"),
    ("[nope]\n", "unknown section [nope]"),
    ("[exec]\nmax_concurrent = 0\n", "max_concurrent"),
    ("[agent]\nlog_level = loud\n", "log_level"),
    ("not ini at all\n", "invalid"),
])
def test_bad_config_files(tmp_path, text, fragment):
    conf = tmp_path / "a.conf"
    conf.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(conf))
    assert fragment in str(info.value) and str(conf) in str(info.value)


def test_policy_deny_wins():
    c = Config()
    c.allow, c.deny = ["*"], ["exec", "re*"]
    assert c.policy_allows("ping") and not c.policy_allows("exec") and not c.policy_allows("reboot")
    assert "deny = exec" in c.denial_reason("exec")
    c.allow, c.deny = ["ping"], []
    assert not c.policy_allows("info") and "allow" in c.denial_reason("info")


def test_parse_size():
    assert parse_size("16M") == parse_size("16MiB") == 16 << 20
    assert parse_size("1024") == 1024
    with pytest.raises(ValueError):
        parse_size("lots")


# == loop pieces =================================================================================

def test_byte_queue_partial_writes_keep_order():
    q = ByteQueue()
    chunks = [os.urandom(n) for n in (10, 1, 5000, 3, 70000)] * 30  # > IOV_MAX chunks
    for c in chunks:
        q.push(c)
    out = bytearray()

    def writev(bufs):
        take = min(777, sum(map(len, bufs)))
        data = b"".join(bytes(b) for b in bufs)[:take]
        out.extend(data)
        return take

    while q.size:
        assert q.write_to(writev) == 777 or q.size == 0
    assert bytes(out) == b"".join(chunks)


def test_byte_queue_would_block():
    q = ByteQueue()
    q.push(b"abc")

    def full(bufs):
        raise BlockingIOError

    with pytest.raises(BlockingIOError):
        q.write_to(full)
    assert q.size == 3


def test_timers_order_and_cancel():
    now = [0.0]
    t = Timers(clock=lambda: now[0])
    fired = []
    t.call_later(2, lambda: fired.append("b"))
    t.call_later(1, lambda: fired.append("a"))
    t.call_later(1.5, lambda: fired.append("x")).cancel()
    assert t.timeout() == 1
    now[0] = 5
    t.run_due()
    assert fired == ["a", "b"] and t.timeout() is None


# == ports =======================================================================================

def test_virtio_port_is_found_by_name_not_number(tmp_path):
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    for node, name in (("vport1p1", "org.qemu.guest_agent.0"), ("vport2p3", "org.guestlink.ctl")):
        (sysfs / node).mkdir(parents=True)
        (sysfs / node / "name").write_text(name + "\n")
    dev.mkdir()
    (dev / "vport1p1").write_text("")
    (dev / "vport2p3").write_text("")
    port = VirtioPort("org.guestlink.ctl", sys_root=str(sysfs), dev_root=str(dev), modprobe=False)
    assert port.find() == str(dev / "vport2p3")
    assert VirtioPort("org.guestlink.data", sys_root=str(sysfs), dev_root=str(dev),
                      modprobe=False).find() is None
    (dev / "virtio-ports").mkdir()
    os.symlink("../vport2p3", str(dev / "virtio-ports" / "org.guestlink.ctl"))
    assert port.find() == str(dev / "virtio-ports" / "org.guestlink.ctl")


def test_unplugged_or_replugged_port_is_noticed(tmp_path):
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    (sysfs / "vport0p1").mkdir(parents=True)
    (sysfs / "vport0p1" / "name").write_text("org.guestlink.ctl\n")
    (dev / "virtio-ports").mkdir(parents=True)
    (dev / "vport0p1").write_text("")
    os.symlink("../vport0p1", str(dev / "virtio-ports" / "org.guestlink.ctl"))
    port = VirtioPort("org.guestlink.ctl", sys_root=str(sysfs), dev_root=str(dev), modprobe=False)
    port.open()
    try:
        assert not port.replaced()
        # Hot-unplug, then a new port under the same node name: a new device node.
        (dev / "vport0p1").unlink()
        assert port.replaced()
        (dev / "vport0p1").write_text("")
        assert port.replaced()
        # A stale /dev/virtio-ports link pointing at a node sysfs names differently is not used.
        (sysfs / "vport0p1" / "name").write_text("org.other\n")
        (sysfs / "vport0p2").mkdir()
        (sysfs / "vport0p2" / "name").write_text("org.guestlink.ctl\n")
        (dev / "vport0p2").write_text("")
        assert port.find() == str(dev / "vport0p2")
    finally:
        port.close()


def test_missing_port_logs_one_clear_line(tmp_path, caplog):
    port = VirtioPort("org.guestlink.ctl", sys_root=str(tmp_path), dev_root=str(tmp_path), modprobe=False)
    for _ in range(3):
        with pytest.raises(PortAbsent):
            port.open()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1
    assert "control port org.guestlink.ctl not found" in errors[0]
    assert "is the virtio-serial channel configured?" in errors[0]


def test_os_release_parsing():
    text = 'NAME="Debian GNU/Linux"\nID=debian\n# comment\nPRETTY_NAME=\'A \\"quoted\\" one\'\nBAD\n'
    assert sysinfo.parse_os_release(text) == {"NAME": "Debian GNU/Linux", "ID": "debian",
                                              "PRETTY_NAME": 'A \\"quoted\\" one'}


# == the server against a fake virtio port ========================================================

class FakeVirtioPort(Port):
    """A socketpair that behaves like a virtio port: with no host, read() returns 0, writes would
    block and host_present() is False (POLLHUP)."""

    polls_for_host = True
    retry_interval = 0.1

    def __init__(self):
        self.present = False
        self.agent_end, self.host_end = socket.socketpair()
        self.agent_end.setblocking(False)
        self.host_end.settimeout(5)
        self.opens = 0

    def open(self):
        self.opens += 1
        self.fd = self.agent_end.fileno()
        return self.fd

    def read_into(self, buf):
        if not self.present:
            return 0
        return self.agent_end.recv_into(buf)

    def writev(self, buffers):
        if not self.present:
            raise BlockingIOError(11, "no host")
        return self.agent_end.sendmsg(buffers)

    def host_present(self):
        return self.present

    def close(self):
        self.fd = None


@pytest.fixture
def fake_agent(tmp_path):
    port = FakeVirtioPort()
    config = Config()
    config.socket = str(tmp_path / "agent.sock")
    config.handlers_dir = str(tmp_path / "handlers")
    agent = Agent(config, port=port, install_signals=False)
    codes = []
    thread = threading.Thread(target=lambda: codes.append(agent.run()))
    thread.start()
    yield agent, port
    agent.request_stop()
    thread.join(10)
    assert codes == [0]
    port.agent_end.close()
    port.host_end.close()


def frames_from(sock, decoder, want):
    got = []
    while len(got) < want:
        got.extend(f for f in decoder.feed(sock.recv(65536)) if isinstance(f, Frame))
    return got


def test_no_host_backoff_at_most_one_wakeup_per_second(fake_agent):
    agent, port = fake_agent
    time.sleep(0.2)
    before = agent.stats["wakeups"]
    time.sleep(2.0)
    assert agent.stats["wakeups"] - before <= 3
    assert agent.port_state == "absent"
    # a host appears: within about a second the queued HELLO reaches it
    port.present = True
    dec = FrameDecoder()
    hello = frames_from(port.host_end, dec, 1)[0]
    assert hello.type == FrameType.HELLO
    port.host_end.sendall(m.encode_sync("n-1") + m.encode_request(1, "ping"))
    ack, pong = frames_from(port.host_end, dec, 2)
    assert ack.type == FrameType.SYNC_ACK and pong.type == FrameType.RESPONSE
    # connected and idle: no wakeups at all
    before = agent.stats["wakeups"]
    time.sleep(1.0)
    assert agent.stats["wakeups"] == before
    # the host goes away (POLLHUP, read returns 0): the session ends, the agent backs off again
    port.present = False
    port.host_end.sendall(b"x")  # makes the fd readable so the agent notices
    deadline = time.monotonic() + 5
    while agent.port_state != "absent" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert agent.port_state == "absent" and agent.session is None
    assert port.opens == 1  # the port stays open while no host is connected
    port.present = True
    assert frames_from(port.host_end, dec, 1)[0].type == FrameType.HELLO
    port.host_end.sendall(m.encode_request(2, "ping"))
    assert m.parse_error(frames_from(port.host_end, dec, 1)[0].payload)[0] == "not_ready"


def test_unexpected_exception_in_a_command_is_internal_and_the_agent_keeps_running(fake_agent):
    agent, port = fake_agent

    def broken(rid, args):
        raise ZeroDivisionError("oops")

    agent._op_info = broken
    port.present = True
    dec = FrameDecoder()
    assert frames_from(port.host_end, dec, 1)[0].type == FrameType.HELLO
    port.host_end.sendall(m.encode_sync("n-2") + m.encode_request(5, "info") + m.encode_request(6, "ping"))
    ack, err, pong = frames_from(port.host_end, dec, 3)
    assert (err.type, err.id) == (FrameType.ERROR, 5)
    code, message, _ = m.parse_error(err.payload)
    assert code == "internal" and "ZeroDivisionError" in message
    assert (pong.type, pong.id) == (FrameType.RESPONSE, 6)
