"""guestlink.host.remote without a network: URI parsing (hostile ones refused), the ssh command
line, the private directory's checks, the URI precedence and the CLI's -c. The real ssh hop
(sshd, libvirtd, VM) is tests/vm/test_remote_e2e.py."""
import os
import stat

import pytest

from guestlink import cli
from guestlink import libvirt as L
from guestlink.host import remote as R


def test_parse_ssh_uris():
    hop = R.SshHop.parse("qemu+ssh://alice@hv2.example:2222/system?keyfile=/k/id&no_verify=1"
                         "&known_hosts=/k/kh&socket=/run/libvirt/libvirt-sock")
    assert (hop.driver, hop.user, hop.host, hop.port, hop.path) == (
        "qemu", "alice", "hv2.example", 2222, "/system")
    assert (hop.keyfile, hop.no_verify, hop.known_hosts, hop.socket) == (
        "/k/id", True, "/k/kh", "/run/libvirt/libvirt-sock")
    assert hop.where == "alice@hv2.example:2222"
    hop = R.SshHop.parse("qemu+ssh://hv2/system?no_verify=0")
    assert (hop.user, hop.port, hop.no_verify, hop.where) == (None, None, False, "hv2")
    assert R.is_ssh_uri("qemu+ssh://hv2/system") and R.is_ssh_uri("QEMU+SSH://hv2/system")
    for local in ("qemu:///system", "qemu+unix:///system?socket=/x", "", None, "qemu+tcp://h/"):
        assert not R.is_ssh_uri(local)


@pytest.mark.parametrize("uri", [
    "qemu+ssh:///system",                         # no host
    "qemu+ssh://-oProxyCommand=evil/system",      # a host that ssh would take as an option
    "qemu+ssh://-x@hv/system",                    # same for the user
    "qemu+ssh://hv:99999/system",                 # port out of range
    "qemu+ssh://hv:abc/system",
    "qemu+ssh://hv/system?keyfile=/k&evil=1",     # a parameter guestlink does not know
    "+ssh://hv/system",                           # no driver
])
def test_hostile_or_invalid_uris_are_refused(uri):
    with pytest.raises(ValueError):
        R.SshHop.parse(uri)
    with pytest.raises(L.LibvirtUnavailable):  # before any ssh runs
        L.backend(uri)


def test_ssh_command_line(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setenv(R.SSH_CONFIG_ENV, "/etc/my-ssh-config")
    hop = R.SshHop.parse("qemu+ssh://bob@hv:2200/system?keyfile=/k/id&no_verify=1&known_hosts=/kh")
    args = hop.ssh_args()
    assert args[:3] == ["ssh", "-F", "/etc/my-ssh-config"]
    assert "ControlPath=" + hop.control_path in args and "BatchMode=yes" in args
    for pair in (["-p", "2200"], ["-l", "bob"], ["-i", "/k/id"]):
        i = args.index(pair[0])
        assert args[i:i + 2] == pair
    assert "StrictHostKeyChecking=no" in args and "UserKnownHostsFile=/kh" in args
    assert hop.control_path.startswith(str(tmp_path / "guestlink") + "/cm-")
    assert hop.manual_command() == "ssh -p 2200 -i /k/id bob@hv true"
    # one master per (user, host, port, options); stable names for forwarded sockets
    other = R.SshHop.parse("qemu+ssh://bob@hv:2201/system")
    assert other.control_path != hop.control_path
    assert hop.local_socket("/a.sock") == hop.local_socket("/a.sock") != hop.local_socket("/b")
    assert len(hop.local_socket("/" + "x" * 500)) < 108  # fits sockaddr_un whatever the remote


def test_private_dir_is_created_0700_and_refused_when_not_private(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    path = R.private_dir()
    assert path == str(tmp_path / "guestlink")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    os.chmod(path, 0o755)  # others could reach the forwarded VM sockets
    with pytest.raises(R.SshError, match="not a private directory"):
        R.private_dir()
    os.rmdir(path)
    os.symlink("/tmp", path)  # a symlink planted by someone else
    with pytest.raises(R.SshError, match="not a private directory"):
        R.private_dir()


def test_uri_precedence(monkeypatch):
    monkeypatch.delenv("GUESTLINK_URI", raising=False)
    monkeypatch.delenv("LIBVIRT_DEFAULT_URI", raising=False)
    assert L.default_uri() == "qemu:///system"
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "qemu:///session")
    assert L.default_uri() == "qemu:///session"
    monkeypatch.setenv("GUESTLINK_URI", "qemu+ssh://hv/system")
    assert L.default_uri() == "qemu+ssh://hv/system"
    assert L.default_uri("test:///default") == "test:///default"


def test_unreachable_hypervisor_is_one_line_naming_ssh(monkeypatch, tmp_path, capsys):
    """A real ssh to a port nobody listens on: the error names the ssh hop, exit 69."""
    import socket

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = "qemu+ssh://root@127.0.0.1:%d/system?no_verify=1&known_hosts=%s" % (
        port, tmp_path / "kh")
    code = cli.main(["ping", "-c", uri, "some-vm"])
    err = capsys.readouterr().err
    assert code == 69 and err.count("\n") == 1, err
    assert err.startswith("guestlink: error: ssh to root@127.0.0.1:%d failed: " % port)
    assert "Connection refused" in err


@pytest.mark.parametrize("path", ["rel.sock", "/a:b.sock", "/a\nb", "/a\x7fb", ""])
def test_socket_paths_ssh_cannot_forward_are_refused_before_ssh(monkeypatch, tmp_path, path):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))  # no ssh: it must not get that far
    hop = R.SshHop.parse("qemu+ssh://hv/system")
    with pytest.raises(R.ForwardError, match="^socket: cannot forward"):
        hop.forward(path)
