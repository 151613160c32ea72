"""Finding 2 of issue 24: Ray's session directory was world-writable (``/tmp/ray``, 0777, no sticky
bit). A local user replaced the dashboard's job-head socket, captured the ``Authorization: Bearer``
token of the owner's dashboard calls, and with it ran a Ray job as the service's user.

Replayed on the session's real Ray (``tests/conftest.py``'s ``serve_app`` starts it with
``coe.ray_local.init_local_ray``, as ``coe serve`` does): Ray's temp, session, socket and log
directories are inside ``$COE_HOME/ray``, which is 0700 and the service user's (Ray's own workers
make the directories below it 0777 at every start; inside a 0700 directory that grants nobody
anything), Ray's files are 0600, and a throwaway local user can neither list nor read them, nor
create, remove or replace a file in the sockets directory, even where ``COE_HOME`` is 0755. Then: a directory that is
not private (another user's, group/other-writable, a symlink) is refused with one line that names
it, by ``coe serve`` before anything starts. (A ``COE_HOME`` too deep for unix-socket paths, with
the dashboard's sockets, is replayed on a Ray of its own in ``test_own_ray.py``.)"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from security_helpers import as_user, assert_denied, local_user  # noqa: F401 - local_user is a fixture

pytestmark = pytest.mark.timeout(180)


def _node():
    import ray

    return ray._private.worker._global_node


def _private(path: Path) -> None:
    st = os.lstat(path)
    assert stat.S_ISDIR(st.st_mode), f"{path} is not a directory"
    assert st.st_uid == os.getuid(), f"{path} belongs to uid {st.st_uid}"
    assert stat.S_IMODE(st.st_mode) == 0o700, f"{path} has mode {stat.S_IMODE(st.st_mode):o}"


def test_ray_dirs_are_private_and_under_coe_home(serve_app, coe_home):
    node = _node()
    temp, session = Path(node.get_temp_dir_path()), Path(node.get_session_dir_path())
    # the session's COE_HOME is short enough for unix-socket paths: no fall-back
    assert temp == coe_home / "ray" / "tmp", temp
    assert session.parent == temp and not temp.is_symlink()
    _private(coe_home / "ray")
    for d in (temp, session, session / "sockets", session / "logs"):
        assert d.is_dir() and not d.is_symlink() and d.stat().st_uid == os.getuid(), d
    # every socket of this Ray lives there, and the path fits a unix socket address
    for sock in (node.raylet_socket_name, node.plasma_store_socket_name):
        assert sock.startswith(str(session / "sockets") + "/") and len(sock.encode()) <= 107, sock
    # Ray's processes ran with umask 077: their files are the service user's alone
    logs = [p for p in (session / "logs").iterdir() if p.is_file()]
    assert logs and all(stat.S_IMODE(p.stat().st_mode) & 0o077 == 0 for p in logs), \
        [(p.name, oct(p.stat().st_mode)) for p in logs if p.stat().st_mode & 0o077][:5]
    # the stable path the banner and the docs name
    assert (coe_home / "ray" / "tmp" / "session_latest" / "logs").is_dir()


def test_a_local_user_can_neither_read_nor_replace_anything(serve_app, coe_home, local_user):
    node = _node()
    temp, session = Path(node.get_temp_dir_path()), Path(node.get_session_dir_path())
    sockets, logs = session / "sockets", session / "logs"
    # a file of the service's in the sockets dir, standing for a socket (the real ones stay intact)
    probe = sockets / "coe-probe"
    probe.write_text("owner")
    theirs = Path(tempfile.gettempdir()) / f"{local_user}-file"
    mode = stat.S_IMODE(coe_home.stat().st_mode)
    os.chmod(coe_home, 0o755)  # like ~/.local/share/coe: what stops the user is Ray's dirs, not COE_HOME
    try:
        assert as_user(local_user, "touch", str(theirs)).returncode == 0
        assert as_user(local_user, "stat", str(coe_home / "ray")).returncode == 0  # it can get that far
        assert_denied(local_user, "ls", str(temp))
        assert_denied(local_user, "ls", str(session))
        assert_denied(local_user, "ls", str(logs))
        assert_denied(local_user, "cat", str(logs / "raylet.out"))
        assert_denied(local_user, "touch", str(sockets / "planted"))
        assert_denied(local_user, "rm", "-f", str(probe))
        assert_denied(local_user, "mv", "-f", str(theirs), str(probe))
        assert_denied(local_user, "ln", "-sf", str(theirs), str(probe))
        assert probe.read_text() == "owner" and not (sockets / "planted").exists()
    finally:
        os.chmod(coe_home, mode)
        probe.unlink(missing_ok=True)
        theirs.unlink(missing_ok=True)


# --------------------------------------------------------------- directories that are not private
def _refused(home: Path, culprit: Path) -> str:
    from coe.ray_local import RayDirError, ray_dirs

    with pytest.raises(RayDirError) as e:
        ray_dirs(home)
    msg = str(e.value)
    assert "\n" not in msg and str(culprit) in msg, msg
    return msg


def test_a_directory_someone_else_made_is_refused(local_user, tmp_path):
    """The short fall-back of a deep COE_HOME has a predictable name in /tmp: another user can make
    it first. And ``$COE_HOME/ray`` itself: another user's, world-writable, or a symlink."""
    from coe.ray_local import fallback_root

    deep = tmp_path / ("d" * 60) / "home"
    deep.mkdir(parents=True)
    short = fallback_root(deep)
    assert len(str(short)) < 40 and short.parent == Path("/tmp")
    assert as_user(local_user, "mkdir", "-m", "0700", str(short)).returncode == 0
    try:
        msg = _refused(deep, short)
        assert local_user in msg and "remove" in msg, msg
    finally:
        subprocess.run(["rm", "-rf", str(short)], timeout=30)

    home = tmp_path / "h1"
    (home / "ray").mkdir(parents=True)
    os.chmod(home / "ray", 0o777)  # ours, but anyone could have put something in it
    assert "writable" in _refused(home, home / "ray")

    home = tmp_path / "h2"
    home.mkdir()
    (home / "ray").mkdir(mode=0o700)
    os.chown(home / "ray", int(as_user(local_user, "id", "-u").stdout), -1)
    _refused(home, home / "ray")

    home = tmp_path / "h3"
    home.mkdir()
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (home / "ray").symlink_to(tmp_path / "elsewhere")
    assert "symbolic link" in _refused(home, home / "ray")


def test_coe_serve_refuses_before_anything_starts(local_user, tmp_path):
    """`coe serve` says which directory and what to do, in one line, before it starts Redis or Ray."""
    from coe.ray_local import fallback_root

    deep = tmp_path / ("e" * 60) / "home"
    deep.mkdir(parents=True)
    short = fallback_root(deep)
    assert as_user(local_user, "mkdir", "-m", "0777", str(short)).returncode == 0
    try:
        env = {**os.environ, "COE_HOME": str(deep), "COE_REDIS_URL": "redis://127.0.0.1:9/0", "COLUMNS": "200"}
        out = subprocess.run([sys.executable, "-m", "coe.cli", "serve", "--port", "18998"], env=env,
                             capture_output=True, text=True, timeout=120)
    finally:
        subprocess.run(["rm", "-rf", str(short)], timeout=30)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert "Traceback" not in text and "cannot reach Redis" not in text, text
    line = next(ln for ln in out.stderr.splitlines() if "error:" in ln)
    assert str(short) in line and local_user in line, out.stderr
