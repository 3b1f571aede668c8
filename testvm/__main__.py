"""python3 -m testvm build | boot --agent PYZ   (see testvm/README.md)"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .build import TestbedError, ensure_base
from .vm import TestVM


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m testvm", description="guestlink real-VM test bed")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or reuse) the base image; print its path and size")
    b.add_argument("--cache-dir")
    v = sub.add_parser("boot", help="boot a VM, print its socket paths, run until Ctrl-C")
    v.add_argument("--agent", help="agent zipapp (guestlink-agent.pyz); omit for no agent")
    v.add_argument("--arg", action="append", default=[], help="extra agent argument (repeatable)")
    v.add_argument("--file", action="append", default=[], metavar="GUEST=HOST",
                   help="extra file for the guest (repeatable)")
    v.add_argument("--extra-port", action="append", default=[], metavar="NAME")
    v.add_argument("--memory", type=int, default=512)
    v.add_argument("--smp", type=int, default=2)
    v.add_argument("--append", default="", help="extra kernel command line")
    v.add_argument("--no-reboot", action="store_true", help="guest reboot makes QEMU exit")
    v.add_argument("--workdir", help="default: a new temporary directory")
    v.add_argument("--quiet", action="store_true", help="do not copy the console to stdout")
    v.add_argument("--cache-dir")
    a = ap.parse_args(argv)

    try:
        if a.cmd == "build":
            img = ensure_base(a.cache_dir)
            m = img.manifest
            print(f"kernel     {img.kernel} ({img.kernel.stat().st_size / 1e6:.1f} MB, {img.kernel_version})")
            print(f"initramfs  {img.initramfs} ({img.initramfs.stat().st_size / 1e6:.1f} MB, "
                  f"compression {m['compression']})")
            return 0

        workdir = a.workdir or tempfile.mkdtemp(prefix="testvm-")
        files = {}
        for spec in a.file:
            guest, _, host = spec.partition("=")
            files[guest] = host
        vm = TestVM(workdir, agent_pyz=a.agent, extra_files=files, extra_ports=a.extra_port,
                    memory=a.memory, smp=a.smp, append=a.append, agent_args=a.arg,
                    no_reboot=a.no_reboot, cache_dir=a.cache_dir)
        print(f"booting in {workdir} ...", flush=True)
        vm.start()
        print(f"ready after {vm.boot_seconds:.1f} s", flush=True)
        print(f"  ctl   {vm.ctl_path}")
        print(f"  data  {vm.data_path}")
        for name in a.extra_port:
            print(f"  {name}  {vm.port_path(name)}")
        print(f"  qmp   {vm.qmp_path}")
        print(f"  console log {vm.console_log}")
        print("Ctrl-C to stop", flush=True)
        pos = 0 if not a.quiet else None
        try:
            while vm.is_running():
                if pos is not None:
                    text = vm.console_text()
                    sys.stdout.write(text[pos:])
                    sys.stdout.flush()
                    pos = len(text)
                time.sleep(0.2)
            print(f"QEMU exited (status {vm.returncode})")
        except KeyboardInterrupt:
            print("\nstopping", flush=True)
        finally:
            vm.stop()
            if not a.workdir:
                shutil.rmtree(workdir, ignore_errors=True)
        return 0
    except TestbedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
