"""Configuration parsing and validation: every bad value is one clear line."""

from datetime import time

import pytest

from supervisor_mail import config
from supervisor_mail.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "supervisor_mail.conf"
    path.write_text(text)
    return str(path)


def test_defaults_match_the_design_tables(tmp_path):
    """Every inherited and engine key exists with the documented default."""
    cfg = config.load(write(tmp_path, ""), environ={})
    expected = {
        "engine.max_workers": 14, "engine.max_tasks_per_worker": 200, "sync.enabled": True,
        "outbox.enabled": True, "sync.auth_error_retry": 1800, "sync.hi_recent_interval": 600,
        "sync.hi_recent_interval_nl": 1800, "sync.hi_full_interval": 3600,
        "sync.hi_full_interval_nl": 4800, "sync.lo_sync_start": time(20, 0),
        "engine.pid_dir": "/run/supervisor_mail/pid", "engine.send_workers": 8,
        "engine.host_id": "127.0.0.1", "engine.data_dir": "/run/supervisor_mail",
        "engine.log_dir": "/var/log/supervisor_mail", "engine.log_keep_days": 30,
        "engine.user": None, "engine.allow_root": False, "engine.stop_timeout": 30,
        "database.dsn": None, "database.statement_timeout": 30, "database.lock_timeout": 10,
        "planner.interval": 5, "sync.logged_in_window": 900, "sync.batch_size": 500,
        "sync.max_message_size": 52428800, "outbox.claim_timeout": 300,
        "outbox.max_lifetime": 432000, "watchdog.check_interval": 1,
        "watchdog.worker_timeout": 120, "watchdog.kill_grace": 5, "watchdog.stall_timeout": 600,
        "watchdog.max_task_failures": 3, "watchdog.max_reset_backoff": 3600,
        "metrics.listen": None, "cluster.lease_ttl": 60,
    }
    for name, value in expected.items():
        assert cfg[name] == value, name
    assert cfg.sync_workers == 6
    php = {s.php: s.name for s in config.SETTINGS if s.php}
    assert php["BG_MAX_THREADS"] == "engine.max_workers"
    assert php["BACKPROC_PID_LOCATION"] == "engine.pid_dir"
    assert len(php) == 11


def test_values_are_typed(tmp_path):
    """Integers, booleans in any case, times and listen addresses are parsed."""
    path = write(tmp_path, "[engine]\nmax_workers = 6\nsend_workers = 2\nallow_root = YES\n"
                           "[sync]\nlo_sync_start = 7:30\nenabled = False\n"
                           "[metrics]\nlisten = 127.0.0.1:9464\n")
    cfg = config.load(path, environ={})
    assert cfg.engine.max_workers == 6 and cfg.sync_workers == 4
    assert cfg.engine.allow_root is True and cfg.sync.enabled is False
    assert cfg.sync.lo_sync_start == time(7, 30)
    assert cfg.metrics.listen == ("127.0.0.1", 9464)


def test_environment_overrides_the_file(tmp_path):
    """SUPERVISOR_MAIL_<SECTION>_<KEY> wins over the file."""
    path = write(tmp_path, "[planner]\ninterval = 7\n")
    cfg = config.load(path, environ={"SUPERVISOR_MAIL_PLANNER_INTERVAL": "9",
                                     "SUPERVISOR_MAIL_DATABASE_DSN": "dbname=x"})
    assert cfg.planner.interval == 9
    assert cfg.database.dsn == "dbname=x"


@pytest.mark.parametrize("text, expected", [
    ("[sync]\nhi_recent_interval = -5\n",
     "[sync] hi_recent_interval = '-5': must be an integer >= 1"),
    ("[sync]\nlo_sync_start = 25:99\n",
     "[sync] lo_sync_start = '25:99': must be a local time HH:MM from 00:00 to 23:59"),
    ("[engine]\nmax_workers = 0\n", "[engine] max_workers = '0': must be an integer >= 2"),
    ("[engine]\nmax_workers = 8\nsend_workers = 8\n",
     "[engine] send_workers = 8 must be less than max_workers = 8"),
    ("[enigne]\nmax_workers = 3\n", "unknown section [enigne] (did you mean engine?)"),
    ("[engine]\nmax_worker = 3\n", "unknown key [engine] max_worker (did you mean max_workers?)"),
    ("[engine]\nallow_root = maybe\n", "[engine] allow_root = 'maybe': must be true or false"),
    ("[metrics]\nlisten = 9464\n", "[metrics] listen = '9464': must be HOST:PORT"),
    ("[engine]\npid_dir = run/pid\n", "[engine] pid_dir = 'run/pid': must be an absolute path"),
    ("max_workers = 3\n", "not a valid INI file"),
])
def test_bad_values_are_one_line_naming_file_key_and_fix(tmp_path, text, expected):
    """A bad value names the file, the key, the value and what is allowed."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        config.load(path, environ={})
    message = str(err.value)
    assert message.startswith(path)
    assert expected in message
    assert "\n" not in message


def test_bad_environment_value_names_the_variable(tmp_path):
    """An override from the environment is validated like the file."""
    with pytest.raises(ConfigError, match="environment SUPERVISOR_MAIL_WATCHDOG_KILL_GRACE"):
        config.load(write(tmp_path, ""), environ={"SUPERVISOR_MAIL_WATCHDOG_KILL_GRACE": "x"})


def test_missing_named_file_is_an_error(tmp_path):
    """-c with a file that does not exist is refused, not silently defaulted."""
    with pytest.raises(ConfigError, match="no such configuration file"):
        config.load(str(tmp_path / "nope.conf"), environ={})


def test_required_dsn_says_where_to_set_it(tmp_path):
    """database.dsn has no default; asking for it says how to give it."""
    cfg = config.load(write(tmp_path, ""), environ={})
    with pytest.raises(ConfigError, match=r"\[database\] dsn is not set.*SUPERVISOR_MAIL_DATABASE"):
        cfg.require("database.dsn")


def test_show_masks_passwords(tmp_path):
    """config show never prints a password inside the DSN."""
    for dsn in ("host=db user=app password=s3cret dbname=crm",
                "postgresql://app:s3cret@db/crm"):
        cfg = config.load(write(tmp_path, f"[database]\ndsn = {dsn}\n"), environ={})
        shown = config.show(cfg)
        assert "s3cret" not in shown
        assert "***" in shown


def test_sample_file_is_the_declaration(tmp_path):
    """etc/supervisor_mail.conf is generated from the settings and parses to the defaults."""
    from pathlib import Path

    sample = Path(__file__).parent.parent / "etc" / "supervisor_mail.conf"
    assert sample.read_text() == config.sample()
    cfg = config.load(write(tmp_path, config.sample()), environ={})
    assert all(cfg[s.name] == s.default for s in config.SETTINGS)


def test_readme_reference_is_the_declaration():
    """The README's configuration reference cannot drift from the declaration."""
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert config.reference_markdown() in readme
