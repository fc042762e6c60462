"""Reading the old engine's config.inc."""

import pytest

from supervisor_mail import config, legacy
from supervisor_mail.errors import ConfigError

SAMPLE_INC = """<?php
// The old engine's settings, as sites had them.
define('BG_MAX_THREADS', 20);
define('BG_MAX_TASKS_PER_THREAD', 150);
define("EMAIL_BACKGROUND_SYNC_ENABLED", TRUE);
define('EMAIL_OUTBOX_ENABLED', false);
define('EMAIL_AUTH_ERROR_CHECK_RETRY_TIME', 900);
define('EMAIL_BG_HI_FOLDERS_RECENT_SYNC_INTERVAL', 300);
define('EMAIL_BG_HI_FOLDERS_RECENT_SYNC_INTERVAL_NL', 1200);
define('EMAIL_BG_HI_FOLDERS_FOLDERS_FULL_SYNC_INTERVAL', 7200);
define('EMAIL_BG_HI_FOLDERS_FOLDERS_FULL_SYNC_INTERVAL_NL', 9600);
define('EMAIL_BG_LO_FOLDERS_SYNC_START', '21:30');
define('BACKPROC_PID_LOCATION', '/var/run/crm/pid');
define('DB_HOST', 'localhost');
define('LOG_LOCATION', __DIR__.'/../log');
"""


def test_every_constant_of_the_table_converts(tmp_path):
    """A config.inc with every inherited constant becomes an INI that loads to those values."""
    inc = tmp_path / "config.inc"
    inc.write_text(SAMPLE_INC)
    ini = legacy.import_inc(str(inc))
    converted = tmp_path / "converted.conf"
    converted.write_text(ini)
    cfg = config.load(str(converted), environ={})
    assert cfg.engine.max_workers == 20
    assert cfg.engine.max_tasks_per_worker == 150
    assert cfg.sync.enabled is True and cfg.outbox.enabled is False
    assert cfg.sync.auth_error_retry == 900
    assert cfg.sync.hi_recent_interval == 300 and cfg.sync.hi_recent_interval_nl == 1200
    assert cfg.sync.hi_full_interval == 7200 and cfg.sync.hi_full_interval_nl == 9600
    assert cfg.sync.lo_sync_start.strftime("%H:%M") == "21:30"
    assert cfg.engine.pid_dir == "/var/run/crm/pid"
    assert len(legacy.read_inc(SAMPLE_INC).values) == len(config.BY_PHP)


def test_unknown_and_unevaluable_are_reported(tmp_path):
    """Constants the engine does not use, and expressions, are named as notes."""
    imported = legacy.read_inc(SAMPLE_INC + "define('BACKPROC_PID_LOCATION', __DIR__.'/pid');\n")
    notes = "\n".join(imported.notes)
    assert "DB_HOST is not used by supervisor_mail" in notes
    assert ("BACKPROC_PID_LOCATION = __DIR__.'/pid' is an expression that cannot be evaluated "
            "here; set [engine] pid_dir by hand") in notes


@pytest.mark.parametrize("text, value", [
    ("'abc'", "abc"), ('"a\\"b"', 'a"b'), ("'it\\'s'", "it's"), ("TRUE", True),
    ("False", False), ("42", 42), ("-3", -3), ("NULL", None),
])
def test_php_literals(text, value):
    """Strings in either quote, booleans in any case, integers and null are understood."""
    assert legacy.php_literal(text) == value


@pytest.mark.parametrize("text", ["__DIR__.'/x'", "FOO", "60*5", "'a'.'b'", '"$x"'])
def test_php_expressions_are_refused(text):
    """Anything that is not a literal is not guessed at."""
    with pytest.raises(legacy.Expression):
        legacy.php_literal(text)


def test_integer_hour_start_and_out_of_range(tmp_path):
    """An hour given as an integer becomes HH:00; a value the engine refuses is a note."""
    imported = legacy.read_inc("define('EMAIL_BG_LO_FOLDERS_SYNC_START', 20);\n"
                               "define('BG_MAX_THREADS', 0);\n")
    assert imported.values == {"sync.lo_sync_start": "20:00"}
    assert "BG_MAX_THREADS = 0 does not fit [engine] max_workers" in imported.notes[0]


def test_a_file_without_defines_is_an_error(tmp_path):
    """A file that is not a config.inc says so."""
    path = tmp_path / "other.inc"
    path.write_text("<?php echo 1;\n")
    with pytest.raises(ConfigError, match="no define"):
        legacy.import_inc(str(path))
