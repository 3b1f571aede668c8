"""The agent's paged recursive listing (fs.list): pages continue the kept walk of the tree."""
import os
import types

import pytest

from guestlink.agent import transfers as AT
from guestlink.agent.config import Config
from guestlink.agent.execs import OpError
from guestlink.protocol import Fields, codes


def _files(tmp_path):
    config = Config()
    config.read_roots = [str(tmp_path)]
    agent = types.SimpleNamespace(config=config, session=object())
    return AT.FileOps(agent), agent


def _tree(root):
    for d in ("a", "a/b", "c"):
        os.mkdir(os.path.join(root, d))
    for f in ("a/1", "a/b/2", "a/b/3", "c/4", "z"):
        with open(os.path.join(root, f), "w") as fh:
            fh.write(f)
    os.symlink("../z", os.path.join(root, "c", "link"))
    os.symlink("/", os.path.join(root, "c", "root"))  # not followed


EXPECTED = ["a", "a/1", "a/b", "a/b/2", "a/b/3", "c", "c/4", "c/link", "c/root", "z"]


def _list_all(files, path, pages=None):
    out, start = [], 0
    while start is not None:
        page = files.op_fs_list(1, Fields({"path": path, "start": start}, "args"))
        out.extend(page["entries"])
        if pages is not None:
            pages.append(len(page["entries"]))
        start = page["next"]
    return out


def test_pages_walk_the_tree_once_in_preorder(tmp_path, monkeypatch):
    _tree(str(tmp_path))
    files, _ = _files(tmp_path)
    monkeypatch.setattr(AT, "LIST_PAGE", 3)
    walks = []
    real = AT._walk_tree
    monkeypatch.setattr(AT, "_walk_tree", lambda fd, root: walks.append(root) or real(fd, root))
    pages = []
    entries = _list_all(files, str(tmp_path), pages)
    assert [e["path"] for e in entries] == EXPECTED
    assert pages == [3, 3, 3, 1]
    assert walks == [str(tmp_path)]  # later pages continued the first walk
    by = {e["path"]: e for e in entries}
    assert by["c/link"]["type"] == "symlink" and by["c/link"]["target"] == "../z"
    assert by["a/b"]["type"] == "dir" and by["z"]["type"] == "file" and by["z"]["size"] == 1
    assert files._listings == {}  # the finished walk is not kept


def test_a_page_nobody_continued_walks_again_from_its_start(tmp_path, monkeypatch):
    _tree(str(tmp_path))
    files, agent = _files(tmp_path)
    monkeypatch.setattr(AT, "LIST_PAGE", 4)
    first = files.op_fs_list(1, Fields({"path": str(tmp_path), "start": 0}, "args"))
    assert first["next"] == 4
    again = files.op_fs_list(2, Fields({"path": str(tmp_path), "start": 2}, "args"))
    assert [e["path"] for e in again["entries"]] == EXPECTED[2:6]
    agent.session = object()  # a new host session does not continue the old one's walk
    other = files.op_fs_list(3, Fields({"path": str(tmp_path), "start": 4}, "args"))
    assert [e["path"] for e in other["entries"]] == EXPECTED[4:8]


def test_kept_walks_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(AT, "LIST_PAGE", 1)
    files, _ = _files(tmp_path)
    for i in range(AT.MAX_LISTINGS + 3):
        d = tmp_path / ("d%d" % i)
        d.mkdir()
        (d / "x").write_text("x")
        (d / "y").write_text("y")
        assert files.op_fs_list(1, Fields({"path": str(d), "start": 0}, "args"))["next"] == 1
    assert len(files._listings) == AT.MAX_LISTINGS
    # a dropped walk closed the directories it held: as many fds open as before the first
    before = len(os.listdir("/proc/self/fd"))
    files.op_fs_list(1, Fields({"path": str(tmp_path / "d0"), "start": 0}, "args"))
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_tree_deeper_than_the_walk_holds_is_an_error(tmp_path, monkeypatch):
    """A walk holds an fd per level: a guest user's very deep tree must not exhaust them."""
    monkeypatch.setattr(AT, "LIST_DEPTH", 3)
    files, _ = _files(tmp_path)
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    assert [e["path"] for e in _list_all(files, str(tmp_path))] == ["a", "a/b", "a/b/c"]
    (tmp_path / "a" / "b" / "c" / "d").mkdir()
    with pytest.raises(OpError) as exc:
        _list_all(files, str(tmp_path))
    assert exc.value.code == codes.TOO_LARGE and "nested more than 3 deep" in str(exc.value)
