"""ftz_edge.atomic: no folder replaced unless it is provably ours, no rename error as a traceback,
no leftovers of killed writers left on disk (issue 13, items 1, 5 and 6)."""

import errno
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ftz_edge import atomic
from ftz_edge.atomic import DestinationError, atomic_folder, check_destination, owner_tag, sweep_stale, work_folder


@pytest.fixture(scope="module")
def dead_pid():
    """The PID of a process that has exited (and been reaped): its leftovers are stale."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    assert not atomic.pid_alive(process.pid)
    return process.pid


def test_a_non_empty_folder_is_replaced_only_when_the_check_accepts_it(tmp_path):
    user = tmp_path / "webapp"
    user.mkdir()
    (user / "index.html").write_text("precious")
    with pytest.raises(DestinationError, match="exists and is not empty"), atomic_folder(user) as tmp:
        (tmp / "x").write_text("new")
    assert (user / "index.html").read_text() == "precious"

    def not_ours(folder):
        raise ValueError("no marker file")

    with pytest.raises(DestinationError, match=r"exists and is not a bundle \(no marker file\)"), \
            atomic_folder(user, not_ours, "a bundle") as tmp:
        (tmp / "x").write_text("new")
    assert (user / "index.html").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["webapp"]  # nothing left beside it

    with atomic_folder(user, lambda folder: None, "a bundle") as tmp:  # accepted: replaced
        (tmp / "x").write_text("new")
    assert sorted(p.name for p in user.iterdir()) == ["x"]


def test_a_missing_or_empty_folder_needs_no_check(tmp_path):
    (tmp_path / "empty").mkdir()
    for name in ("empty", "new"):
        with atomic_folder(tmp_path / name) as tmp:
            (tmp / "f").write_text(name)
        assert (tmp_path / name / "f").read_text() == name


def test_files_links_and_mount_points_are_refused(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DestinationError, match="is a file"):
        check_destination(tmp_path / "file")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(DestinationError, match="symbolic link"):
        check_destination(tmp_path / "link")
    # The root of the file system is a mount point on every machine: refused before any work.
    with pytest.raises(DestinationError, match="is a mount point"):
        check_destination(Path("/"))
    out = tmp_path / "mnt"
    out.mkdir()
    monkeypatch.setattr(atomic.os.path, "ismount", lambda path: Path(path) == out)
    ran = []
    with pytest.raises(DestinationError, match="mount point"), atomic_folder(out) as tmp:
        ran.append(tmp)
    assert not ran  # the work never started


@pytest.mark.parametrize("refused", ["old folder aside", "new folder into place"])
def test_a_refused_rename_is_a_clear_error_and_keeps_the_old_folder(tmp_path, monkeypatch, refused):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "old").write_text("old")
    real_replace = os.replace

    def busy(src, dst):
        # EBUSY is what renaming a mount point gives (the first rename); the second is tried too.
        if (Path(src) == out) if refused == "old folder aside" else Path(src).name.startswith(".bundle.tmp-"):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", busy)
    with pytest.raises(DestinationError, match="cannot move the finished folder into place.*(busy|Busy).*mount point"), \
            atomic_folder(out, lambda folder: None) as tmp:
        (tmp / "new").write_text("new")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    assert (out / "old").read_text() == "old"


def test_temporary_names_carry_their_owner(tmp_path):
    with atomic_folder(tmp_path / "out") as tmp:
        assert tmp.name.startswith(f".out.tmp-{owner_tag()}-")
    with work_folder("ftz-test-", tmp_path) as work:
        assert work.name.startswith(f"ftz-test-{owner_tag()}-")
    assert not work.exists()


def test_the_next_write_sweeps_leftovers_of_killed_writers_only(tmp_path, dead_pid, caplog):
    host = atomic.host_tag()
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "f").write_text("current")
    dead_tmp = tmp_path / f".bundle.tmp-{host}-{dead_pid}-abc123"
    dead_old = tmp_path / f".bundle.old-{host}-{dead_pid}"
    live_tmp = tmp_path / f".bundle.tmp-{host}-{os.getppid()}-def456"  # the parent of this test is alive
    other_host = tmp_path / f".bundle.tmp-0000abcd-{dead_pid}-ghi789"  # cannot be judged from here
    other_name = tmp_path / f".other.tmp-{host}-{dead_pid}-jkl012"  # another destination's
    for folder in (dead_tmp, dead_old, live_tmp, other_host, other_name):
        folder.mkdir()
        (folder / "big").write_bytes(b"x" * 1000)
    with caplog.at_level(logging.WARNING, logger="ftz_edge.atomic"), atomic_folder(out, lambda f: None) as tmp:
        (tmp / "f").write_text("new")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["bundle", live_tmp.name, other_host.name, other_name.name])
    assert (out / "f").read_text() == "new"
    said = caplog.text
    assert f"removed {dead_tmp}" in said and f"removed {dead_old}" in said and f"killed process {dead_pid}" in said


def test_a_kill_between_the_two_renames_gets_the_old_folder_back(tmp_path, dead_pid):
    """The old bundle renamed aside, the new one not yet in place: the only complete copy is the
    `.old-` folder. The sweep puts it back; nothing of the user's is lost."""
    host = atomic.host_tag()
    (tmp_path / f".bundle.old-{host}-{dead_pid}").mkdir()
    (tmp_path / f".bundle.old-{host}-{dead_pid}" / "manifest.json").write_text("{}")
    (tmp_path / f".bundle.tmp-{host}-{dead_pid}-xyz").mkdir()
    done = sweep_stale(tmp_path, "bundle")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    assert (tmp_path / "bundle" / "manifest.json").is_file()
    assert any(line.startswith("restored") for line in done) and any(line.startswith("removed") for line in done)


def test_work_folders_of_killed_processes_are_swept(tmp_path, dead_pid):
    host = atomic.host_tag()
    stale = tmp_path / f"ftz-export-{host}-{dead_pid}-aaaa"
    live = tmp_path / f"ftz-export-{host}-{os.getppid()}-bbbb"
    unrelated = tmp_path / "ftz-export-by-hand"
    for folder in (stale, live, unrelated):
        folder.mkdir()
    with work_folder("ftz-export-", tmp_path) as work:
        (work / "vision.fp32.onnx").write_bytes(b"graph")
        assert not stale.exists() and live.is_dir() and unrelated.is_dir()
    assert not work.exists()


def test_export_never_replaces_a_folder_that_is_not_a_bundle(tmp_path, capsys):
    """The data-loss case of issue 13: a web app folder with its own manifest.json."""
    from ftz_edge.export import bundle as bundle_module

    webapp = tmp_path / "webapp"
    webapp.mkdir()
    (webapp / "manifest.json").write_text('{"name": "x"}')
    (webapp / "index.html").write_text("precious")
    code = bundle_module.main(["--out", str(webapp), "--precision", "fp32", "--llm-precision", "fp32"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ftz-export:")]  # (progress bars aside)
    assert code == 2 and len(lines) == 1, err
    assert str(webapp) in lines[0] and "refusing to replace" in lines[0], err
    assert (webapp / "index.html").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["webapp"]
