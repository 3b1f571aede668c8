"""The architecture is enforced, not just described."""
import ast
import pathlib
import shutil
import subprocess
import sys
import zipfile

SRC = pathlib.Path(__file__).resolve().parents[2] / "src" / "guestlink"
IO_MODULES = {"socket", "asyncio", "selectors", "select", "subprocess", "threading", "signal",
              "fcntl", "termios", "mmap", "multiprocessing", "os", "io", "shutil", "tempfile"}


def imported_modules(path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0], node.lineno


def test_protocol_core_is_sans_io():
    offenders = []
    for path in sorted((SRC / "protocol").rglob("*.py")):
        for name, line in imported_modules(path):
            if name in IO_MODULES:
                offenders.append("%s:%d imports %s" % (path.name, line, name))
    assert offenders == []


def test_guest_side_is_stdlib_only():
    stdlib = set(sys.stdlib_module_names)
    offenders = []
    from guestlink.bundle import GUEST_MODULES

    modules = [SRC / m for m in GUEST_MODULES]  # bundled too (the install description)
    for package in ("protocol", "filecopy", "agent"):
        for path in sorted((SRC / package).rglob("*.py")) + (modules if package == "agent" else []):
            for name, line in imported_modules(path):
                if name not in stdlib and name != "guestlink":
                    offenders.append("%s:%d imports %s" % (path, line, name))
    assert offenders == []


def absolute_imports(path):
    """(module, line) for each import in ``path``: relative ones resolved, "from m import n" as m and m.n."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # resolve "from ..host import x" against the package
                parts = ["guestlink"] + list(path.relative_to(SRC).parent.parts)
                base = parts[:len(parts) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names = [module] + [module + "." + a.name for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        yield names, node.lineno


def import_offenders(packages, forbidden):
    offenders = []
    for package in packages:
        for path in sorted((SRC / package).rglob("*.py")):
            for names, line in absolute_imports(path):
                if any(n.startswith(forbidden) for n in names):
                    offenders.append("%s:%d imports %s" % (path, line, names[0]))
    return offenders


def test_guest_side_imports_no_host_code():
    host_only = ("guestlink.host", "guestlink.cli", "guestlink.sync", "guestlink.bundle")
    assert import_offenders(("protocol", "filecopy", "agent"), host_only) == []


def test_host_side_imports_no_agent_code():
    """The host library shares guest-side code only through protocol/ and filecopy/."""
    assert import_offenders(("host",), ("guestlink.agent",)) == []


def test_shared_copy_package_imports_no_agent_code():
    assert import_offenders(("filecopy",), ("guestlink.agent",)) == []


def test_guest_side_runs_on_python_3_8():
    """vermin reads the code statically; no 3.8 interpreter is needed."""
    from guestlink.bundle import GUEST_MODULES

    paths = [str(SRC / "protocol"), str(SRC / "filecopy"), str(SRC / "agent")] + [
        str(SRC / m) for m in GUEST_MODULES]
    vermin = shutil.which("vermin") or str(pathlib.Path(sys.executable).parent / "vermin")
    proc = subprocess.run([vermin, "-q", "--no-tips", "--eval-annotations",
                           "--backport", "typing", "-t=3.8-", "--violations"] + paths,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_agent_bundle_holds_only_guest_code(tmp_path):
    from guestlink.bundle import write_bundle

    target = tmp_path / "agent.pyz"
    write_bundle(str(target))
    names = zipfile.ZipFile(str(target)).namelist()
    assert "__main__.py" in names
    assert any(n.startswith("guestlink/protocol/") for n in names)
    assert any(n.startswith("guestlink/agent/") for n in names)
    assert any(n.startswith("guestlink/filecopy/") for n in names)
    assert "guestlink/image/tree.py" in names  # the installer enroll runs in the guest
    assert not any(n in names for n in ("guestlink/image/backends.py", "guestlink/image/disk.py"))
    assert not any(n.startswith(("guestlink/host/", "guestlink/cli")) for n in names)
    assert target.read_bytes().startswith(b"#!/usr/bin/env python3\n")


def module_name(path):
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["guestlink"] + parts)


def import_graph():
    """module -> the guestlink modules it imports, at module level or inside functions alike (a
    lazy import still closes a circle; only when it runs differs)."""
    paths = sorted(SRC.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    graph = {}
    for path in paths:
        edges = graph.setdefault(module_name(path), set())
        for names, _line in absolute_imports(path):
            imported = [n for n in names[1:] if n in modules]  # "from pkg import submodule"
            if len(imported) < len(names) - 1 or not names[1:]:
                imported.append(names[0])  # "from m import name", "import m"
            edges.update(n for n in imported if n in modules)
    return graph


def import_cycles(graph):
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_import_cycles_are_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert import_cycles(graph) == [["a", "b", "c"]]


def test_the_cli_package_has_no_import_cycle():
    """The CLI imports in one direction: cli.common <- the command groups <- cli.app."""
    cycles = import_cycles(import_graph())
    assert [c for c in cycles if any(m.startswith("guestlink.cli") for m in c)] == []


# --- no module reaches into another module's private names ----------------------------------------

def _is_private(name):
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_names_defined(tree):
    """The underscored names a module defines: functions, classes, assignments at any level, and
    attributes it sets on ``self``/``cls`` or lists in ``__slots__``."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)  # __slots__ entries, getattr(obj, "_name") on its own objects
    return {n for n in names if _is_private(n)}


def private_name_offenders():
    """``x._name`` (x not self/cls) where ``_name`` is a private name of ANOTHER guestlink module,
    and ``from m import _name`` of anything but a private submodule (``_version``)."""
    paths = sorted(SRC.rglob("*.py"))
    trees = {p: ast.parse(p.read_text(), str(p)) for p in paths}
    defined = {p: private_names_defined(t) for p, t in trees.items()}
    everywhere = set().union(*defined.values())
    private_modules = {p.stem for p in paths if _is_private(p.stem) and p.stem != "__init__"}
    offenders = []
    for path, tree in trees.items():
        where = path.relative_to(SRC.parent)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _is_private(node.attr):
                base = node.value
                if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                    continue
                # another module's private name; a name no guestlink module defines belongs to
                # the standard library (os._exit)
                if node.attr not in defined[path] and node.attr in everywhere:
                    offenders.append("%s:%d: .%s" % (where, node.lineno, node.attr))
            elif isinstance(node, ast.ImportFrom):
                offenders += ["%s:%d: from %s import %s" % (where, node.lineno,
                                                            "." * node.level + (node.module or ""),
                                                            alias.name)
                              for alias in node.names
                              if _is_private(alias.name) and alias.name not in private_modules]
    return offenders


def test_private_name_offenders_are_found(tmp_path, monkeypatch):
    pkg = tmp_path / "guestlink"
    pkg.mkdir()
    (pkg / "a.py").write_text("class A:\n    def _own(self):\n        pass\n\n"
                              "def f(a):\n    a._own()\n    import os\n    os._exit(0)\n")
    (pkg / "b.py").write_text("from .a import _hidden\nfrom . import _version\n\n"
                              "def g(a):\n    a._own()\n")
    (pkg / "_version.py").write_text("v = 1\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", pkg)
    assert private_name_offenders() == ["guestlink/b.py:1: from .a import _hidden",
                                        "guestlink/b.py:5: ._own"]


def test_no_module_reaches_into_another_modules_private_names():
    """A module's underscored names are its own: what another module needs is a named API
    (e.g. guestlink.host.session's, documented in its docstring)."""
    assert private_name_offenders() == []
