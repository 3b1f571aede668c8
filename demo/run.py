"""The guestlink demo: boot a tiny VM with the agent and show what guestlink does.

Run through ``scripts/demo`` (which installs what is needed first). Every step runs the real
``guestlink`` command line against the VM's control and data sockets, and prints the command
as you would type it.
"""
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "src")]

from guestlink.bundle import write_bundle  # noqa: E402
from testvm import TestVM  # noqa: E402

BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


def say(text):
    print("\n%s== %s%s" % (BOLD, text, RESET), flush=True)


def guestlink(*args, env, input=None):
    shown = "guestlink " + " ".join(shlex.quote(a) for a in args)
    print("%s$ %s%s" % (DIM, shown, RESET), flush=True)
    command = [sys.executable, "-m", "guestlink"] + list(args)
    proc = subprocess.run(command, env=env, input=input, text=True)
    if proc.returncode not in (0, 3):
        print("%s(exit status %d)%s" % (DIM, proc.returncode, RESET))
    return proc


def main():
    with tempfile.TemporaryDirectory(prefix="guestlink-demo-") as tmp:
        agent = os.path.join(tmp, "guestlink-agent.pyz")
        write_bundle(agent)
        say("Booting a tiny VM (Debian cloud kernel + busybox + python3, QEMU/TCG) with the agent")
        started = time.monotonic()
        with TestVM(os.path.join(tmp, "vm"), agent_pyz=agent) as vm:
            print("booted in %.1f s; control socket %s, data socket %s"
                  % (time.monotonic() - started, vm.ctl_path, vm.data_path))
            env = dict(os.environ, GUESTLINK_CTL=vm.ctl_path, GUESTLINK_DATA=vm.data_path,
                       PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))

            say("ping: the agent answers over the control channel (fresh-nonce handshake first)")
            guestlink("ping", env=env)

            say("info: what the guest says about itself")
            guestlink("info", env=env)

            say("exec: run a command in the guest; output is streamed, the exit code is kept")
            guestlink("exec", "--", "sh", "-c",
                      "echo kernel $(uname -r); for i in 1 2 3; do echo tick $i; sleep 0.5; done; "
                      "echo 'to stderr' >&2; exit 3", env=env)

            say("exec with stdin from the host")
            guestlink("exec", "--", "wc", "-c", env=env, input="hello guest\n")

            say("files: push and pull over the data channel (opened by the agent only for the transfer)")
            local = os.path.join(tmp, "payload.bin")
            with open(local, "wb") as f:
                f.write(os.urandom(8 * 1024 * 1024))
            guestlink("cp", "--json", local, ":/tmp/payload.bin", env=env)
            guestlink("exec", "--", "sha256sum", "/tmp/payload.bin", env=env)
            guestlink("cp", "--json", ":/tmp/payload.bin", os.path.join(tmp, "back.bin"), env=env)
            same = open(local, "rb").read() == open(os.path.join(tmp, "back.bin"), "rb").read()
            print("round trip identical: %s" % same)

            say("two commands at once: the VM serves one client, so the second waits its turn")
            print("%s$ guestlink exec -- sleep 2 &  guestlink ping%s" % (DIM, RESET), flush=True)
            first = subprocess.Popen([sys.executable, "-m", "guestlink", "exec", "--", "sleep", "2"],
                                     env=env)
            time.sleep(1)  # the exec holds the VM by now
            subprocess.run([sys.executable, "-m", "guestlink", "ping"], env=env)
            first.wait()

            say("deliver a script into the guest and run it, in one command")
            script = os.path.join(tmp, "hello.sh")
            with open(script, "w") as f:
                f.write("#!/bin/sh\necho \"hello $1 from $(hostname)\"\nexit 5\n")
            guestlink("run", script, "world", env=env)

            # QEMU's chardev socket takes one host client at a time, so the guest programs of this
            # part run detached in the guest and each host command connects in turn.
            agent_cli = "python3 /opt/guestlink/guestlink-agent.pyz"
            say("messages, guest -> host: a guest program publishes on a topic, the host listens")
            guestlink("exec", "--", "sh", "-c",
                      "setsid sh -c 'sleep 2; %s send --wait 30 demo.events \"hello from inside the VM\"' "
                      "</dev/null >/dev/null 2>&1 &" % agent_cli, env=env)
            guestlink("listen", "demo.events", "--count", "1", env=env)

            say("messages, host -> guest: a guest program waits on a topic, the host publishes")
            guestlink("exec", "--", "sh", "-c",
                      "setsid sh -c '%s listen demo.orders --count 1 >/tmp/orders.txt' "
                      "</dev/null >/dev/null 2>&1 &" % agent_cli, env=env)
            for _ in range(20):  # the guest listener needs a moment to subscribe
                sent = subprocess.run([sys.executable, "-m", "guestlink", "send", "--json", "demo.orders",
                                       "hello from the host"], env=env, capture_output=True, text=True)
                if json.loads(sent.stdout or "{}").get("delivered"):
                    break
                time.sleep(0.5)
            print("%s$ guestlink send --json demo.orders 'hello from the host'%s\n%s"
                  % (DIM, RESET, sent.stdout.strip()))
            guestlink("exec", "--", "cat", "/tmp/orders.txt", env=env)

            say("errors are one line with a distinct exit code, never a traceback")
            guestlink("exec", "--timeout", "1", "--", "sleep", "10", env=env)
            guestlink("ping", "--ctl", os.path.join(tmp, "no-such.sock"), env=env)

            say("shutdown")
            guestlink("shutdown", env=env)
            vm.wait_exit(60)
            print("the VM powered off (QEMU exit status %s)" % vm.returncode)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # the demo reports, it does not dump a traceback
        print("demo: error: %s" % exc, file=sys.stderr)
        sys.exit(1)
