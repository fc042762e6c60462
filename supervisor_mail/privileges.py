"""Dropping root: started as root with ``engine.user`` set, the master creates its
directories for that user and becomes it (group included) before forking anything.
Started as root without it, it refuses, unless ``engine.allow_root`` says otherwise.
"""

from __future__ import annotations

import os
import pwd

from supervisor_mail.config import Config
from supervisor_mail.errors import ConfigError, StateError

DIR_MODE = 0o2770  # u+rwX,g+rwXs,o-rwx, as the old installation guide had it


def is_root() -> bool:
    return os.geteuid() == 0


def drop(cfg: Config) -> None:
    if not is_root():
        return
    user = cfg.engine.user
    if not user:
        if cfg.engine.allow_root:
            return
        raise ConfigError("refusing to run as root: set [engine] user (for example www-data), "
                          "or allow_root = true for a container")
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"[engine] user = {user!r}: no such user on this system") from None
    for path in (cfg.engine.data_dir, cfg.engine.pid_dir, cfg.engine.log_dir):
        try:
            if not os.path.isdir(path):
                os.makedirs(path)
                os.chmod(path, DIR_MODE)  # an existing directory keeps the mode it was given
            os.chown(path, entry.pw_uid, entry.pw_gid)
        except OSError as exc:
            raise StateError(f"{path}: cannot prepare it for {user}: {exc.strerror}") from None
    os.initgroups(user, entry.pw_gid)
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    os.environ["HOME"] = entry.pw_dir

