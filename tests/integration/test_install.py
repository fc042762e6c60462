"""`make install`, `install-ramdisk` and `uninstall` into a temporary DESTDIR: the tree the
README documents, with its modes (and owners, when run as root), a staged tree that works
once copied to its PREFIX, an edited configuration that survives, an uninstall that keeps
data and logs."""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from install_helpers import DEFAULT_PREFIX, ROOT, copy_source, make


def documented_tree() -> list[tuple[str, int, str]]:
    """(path, mode, owner) rows of the README's install table."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- install-tree:begin -->(.*?)<!-- install-tree:end -->", text, re.S)
    assert block, "README.md has no install-tree table"
    rows = re.findall(r"^\| `([^`]+)` \| `([0-7]{4})` \| ([\w:-]+) \|", block[1], re.M)
    assert len(rows) >= 10
    return [(path, int(mode, 8), owner) for path, mode, owner in rows]


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """`make install DESTDIR=stage PREFIX=<tmp>/opt/supervisor_mail` from a copy of the source
    tree (so a concurrent run in the checkout cannot share its build directory)."""
    base = tmp_path_factory.mktemp("install")
    source = copy_source(base / "src")
    prefix = base / "opt" / "supervisor_mail"
    stage = base / "stage"
    proc = make(source, "install", DESTDIR=str(stage), PREFIX=str(prefix))
    return {"source": source, "stage": stage, "prefix": prefix, "output": proc.stdout}


def staged_path(staged, documented: str) -> Path:
    """Where a documented path lands in the staging tree (PREFIX moved under the temp dir)."""
    path = documented.rstrip("/")
    if path.startswith(DEFAULT_PREFIX):
        path = str(staged["prefix"]) + path[len(DEFAULT_PREFIX):]
    return Path(str(staged["stage"]) + path)


def owner_of(path: Path) -> str:
    info = path.stat()
    return f"{pwd.getpwuid(info.st_uid).pw_name}:{grp.getgrgid(info.st_gid).gr_name}"


def test_the_documented_tree_with_its_modes(staged):
    """Every path of the README's table exists with its mode; as root, with its owner too
    (www-data owns the data, pid and log directories)."""
    as_root = os.geteuid() == 0
    for path, mode, owner in documented_tree():
        target = staged_path(staged, path)
        assert target.exists(), f"{path} was not installed ({target})"
        assert target.is_dir() == path.endswith("/"), path
        assert stat.S_IMODE(target.stat().st_mode) == mode, \
            f"{path}: mode {stat.S_IMODE(target.stat().st_mode):04o}, documented {mode:04o}"
        if as_root:
            assert owner_of(target) == owner, path
    if not as_root:
        assert "not owned by www-data" in staged["output"]


def test_installed_config_runs_the_engine_as_www_data(staged):
    """The installed configuration sets engine.user = www-data and the installed paths, and
    the samples name the installed PREFIX and configuration."""
    conf = staged["stage"] / "etc/supervisor_mail/supervisor_mail.conf"
    text = conf.read_text()
    assert re.search(r"^\[engine\]\n(?:.*\n)*?user = www-data$", text, re.M)
    assert "\ndata_dir = /run/supervisor_mail\n" in text
    assert "\nlog_dir = /var/log/supervisor_mail\n" in text
    program = (staged["stage"] / "etc/supervisor/conf.d/supervisor_mail.conf").read_text()
    assert f"command={staged['prefix']}/bin/supervisor-mail run -c " \
           "/etc/supervisor_mail/supervisor_mail.conf" in program
    unit = (staged["stage"] / "etc/systemd/system/supervisor_mail.service").read_text()
    assert f"ExecStart={staged['prefix']}/bin/supervisor-mail run" in unit
    assert "User=www-data" in unit


def test_a_staged_tree_works_once_copied_to_its_prefix(staged, tmp_path):
    """Copied to PREFIX with the staging tree gone, the command runs, reads the installed
    configuration, and nothing in bin/ or pyvenv.cfg still names the staging tree."""
    stage_prefix = staged_path(staged, DEFAULT_PREFIX + "/")
    prefix = staged["prefix"]
    shutil.copytree(stage_prefix, prefix, symlinks=True)
    conf = tmp_path / "supervisor_mail.conf"
    shutil.copy(staged["stage"] / "etc/supervisor_mail/supervisor_mail.conf", conf)
    hidden = staged["stage"].with_name("stage-moved-away")
    staged["stage"].rename(hidden)
    try:
        for name in [*os.listdir(prefix / "bin"), "../pyvenv.cfg"]:
            file = prefix / "bin" / name
            if file.is_file() and not file.is_symlink():
                assert str(staged["stage"]) not in file.read_text(errors="replace"), name
        version = subprocess.run([str(prefix / "bin/supervisor-mail"), "--version"],
                                 capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert version.returncode == 0 and version.stdout.startswith("supervisor-mail "), \
            version.stderr
        shown = subprocess.run([str(prefix / "bin/supervisor-mail"), "config", "show",
                                "-c", str(conf)], capture_output=True, text=True, timeout=60,
                               cwd=tmp_path)
        assert shown.returncode == 0, shown.stderr
        assert "\nuser = www-data\n" in shown.stdout
        compiled = subprocess.run(
            [str(prefix / "bin/python"), "-c",
             "import marshal, supervisor_mail.status as s; "
             "print(marshal.loads(open(s.__cached__, 'rb').read()[16:]).co_filename)"],
            capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert compiled.stdout.startswith(f"{prefix}/lib/"), compiled.stdout + compiled.stderr
    finally:
        hidden.rename(staged["stage"])
        shutil.rmtree(prefix)


def test_reinstall_keeps_an_edited_config_and_uninstall_keeps_data(staged):
    """A second install keeps an edited configuration (and says so); the ramdisk line goes
    into fstab once; uninstall removes the venv, samples, units and fstab line, and keeps the
    edited configuration, the data and the log directories."""
    variables = {"DESTDIR": str(staged["stage"]), "PREFIX": str(staged["prefix"])}
    stage = staged["stage"]
    conf = stage / "etc/supervisor_mail/supervisor_mail.conf"
    edited = conf.read_text().replace("#dsn =", "dsn = dbname=crm")
    conf.write_text(edited)
    again = make(staged["source"], "install", **variables)
    assert "kept your edited" in again.stdout
    assert conf.read_text() == edited

    fstab = stage / "etc/fstab"
    fstab.write_text("/dev/sda1 / ext4 defaults 0 1\n")
    for _ in range(2):
        make(staged["source"], "install-ramdisk", **variables)
    lines = fstab.read_text().splitlines()
    assert sum(line.startswith("tmpfs  /run/supervisor_mail  tmpfs") for line in lines) == 1
    assert "mode=2770" in lines[-1]

    make(staged["source"], "uninstall", **variables)
    assert not staged_path(staged, DEFAULT_PREFIX + "/").exists()
    assert fstab.read_text() == "/dev/sda1 / ext4 defaults 0 1\n"
    assert conf.read_text() == edited
    assert not conf.with_name("supervisor_mail.conf.sample").exists()
    for gone in ("etc/systemd/system/supervisor_mail.service",
                 "etc/supervisor/conf.d/supervisor_mail.conf",
                 "etc/logrotate.d/supervisor_mail", "etc/tmpfiles.d/supervisor_mail.conf"):
        assert not (stage / gone).exists(), gone
    for kept in ("run/supervisor_mail/pid", "var/log/supervisor_mail"):
        assert (stage / kept).is_dir(), kept
