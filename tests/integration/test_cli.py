"""The command line as an administrator meets it: help, usage errors, config, initdb, accounts."""

import os
import subprocess
import sys

import pytest


def run(*args, env=None, input=None):
    """Run ``python -m supervisor_mail`` and return (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "supervisor_mail", *args], capture_output=True,
                          text=True, env=env, input=input, timeout=60)
    return proc.returncode, proc.stdout, proc.stderr


def commands_with_help():
    from supervisor_mail.cli import build_parser

    def walk(parser, path):
        yield path
        for action in parser._actions:
            if hasattr(action, "choices") and isinstance(action.choices, dict):
                for name, sub in action.choices.items():
                    yield from walk(sub, [*path, name])
    return list(walk(build_parser(), []))


@pytest.mark.parametrize("path", commands_with_help(), ids=lambda p: " ".join(p) or "top")
def test_every_command_has_help(path):
    """--help of the program and of every subcommand exits 0 and prints a usage."""
    code, out, err = run(*path, "--help")
    assert code == 0, err
    assert out.startswith("usage: supervisor-mail")


def test_unknown_command_is_a_usage_error():
    """An unknown command exits 2 with a usage line and no traceback."""
    code, out, err = run("frobnicate")
    assert code == 2
    assert err.startswith("usage: supervisor-mail")
    assert "invalid choice: 'frobnicate'" in err
    assert "Traceback" not in err


def test_no_command_is_a_usage_error():
    """Running with no command says a command is required."""
    code, _, err = run()
    assert code == 2 and "a command is required" in err


@pytest.mark.parametrize("text, fragment", [
    ("[engine]\nmax_workers = 0\n", "[engine] max_workers = '0': must be an integer >= 2"),
    ("[sync]\nlo_sync_start = 25:99\n", "[sync] lo_sync_start = '25:99'"),
    ("[watchdog]\ncheck_interval = -1\n", "[watchdog] check_interval = '-1'"),
    ("[engine]\nsend_workers = 14\n", "send_workers = 14 must be less than max_workers = 14"),
    ("[smtp]\nhost = x\n", "unknown section [smtp]"),
    ("[database]\ndsn =\n", "[database] dsn = '': must be a non-empty text"),
    ("[database]\n", "[database] dsn is not set"),
])
def test_config_check_refuses_bad_files(tmp_path, text, fragment):
    """config check gives one line naming file, key, value and what is allowed; exit 3."""
    path = tmp_path / "bad.conf"
    path.write_text(text)
    code, out, err = run("config", "check", "-c", str(path))
    assert code == 3
    assert err.count("\n") == 1 and str(path) in err and fragment in err
    assert "Traceback" not in err


def test_config_check_accepts_a_good_file(tmp_path):
    """A valid file is reported valid with exit 0."""
    path = tmp_path / "good.conf"
    path.write_text("[database]\ndsn = dbname=crm\n[engine]\nmax_workers = 4\nsend_workers = 2\n")
    code, out, _ = run("config", "check", "-c", str(path))
    assert code == 0 and "configuration is valid" in out


def test_config_show_masks_and_import_inc_converts(tmp_path):
    """config show masks the DSN password; import-inc prints an INI that config check accepts."""
    path = tmp_path / "x.conf"
    path.write_text("[database]\ndsn = host=db password=topsecret\n")
    code, out, _ = run("config", "show", "-c", str(path))
    assert code == 0 and "topsecret" not in out and "password=***" in out
    inc = tmp_path / "config.inc"
    inc.write_text("<?php\ndefine('BG_MAX_THREADS', 10);\ndefine('EMAIL_OUTBOX_ENABLED', FALSE);\n")
    code, out, _ = run("config", "import-inc", str(inc))
    assert code == 0 and "max_workers = 10" in out and "enabled = false" in out
    converted = tmp_path / "converted.conf"
    converted.write_text(out + "\n[database]\ndsn = dbname=x\n")
    assert run("config", "check", "-c", str(converted))[0] == 0
    code, _, err = run("config", "import-inc", str(tmp_path / "missing.inc"))
    assert code == 3 and "cannot read the old configuration" in err


def write_config(tmp_path, dsn):
    path = tmp_path / "engine.conf"
    path.write_text(f"[database]\ndsn = {dsn}\n")
    return str(path)


def test_initdb_twice_then_nothing_changed(empty_dsn, tmp_path):
    """initdb applies the schema, and a second run says nothing changed."""
    conf = write_config(tmp_path, empty_dsn)
    code, out, err = run("initdb", "-c", conf)
    assert code == 0, err
    assert "applied" in out and "0001_initial" in out
    code, out, _ = run("initdb", "-c", conf)
    assert code == 0 and "nothing changed" in out


def test_initdb_unreachable_database(tmp_path):
    """An unreachable database is one line and exit 4."""
    conf = write_config(tmp_path, f"host={tmp_path} port=1 dbname=x")
    code, _, err = run("initdb", "-c", conf)
    assert code == 4 and "cannot connect to PostgreSQL" in err and err.count("\n") == 1


def test_account_add_list_remove(db_dsn, tmp_path):
    """Accounts are added with a password file (never argv), listed and removed."""
    conf = write_config(tmp_path, db_dsn)
    secret = tmp_path / "pw"
    secret.write_text("pa55word\n")
    code, out, err = run("account", "add", "-c", conf, "--email", "ann@example.org",
                         "--imap-host", "imap.example.org", "--smtp-host", "smtp.example.org",
                         "--password-file", str(secret))
    assert code == 0, err
    assert out.startswith("added account ")
    acntid = out.split()[2]
    code, out, _ = run("account", "list", "-c", conf)
    assert "ann@example.org" in out and "imap.example.org:993 tls" in out
    assert "pa55word" not in out
    code, out, _ = run("account", "remove", "-c", conf, acntid)
    assert code == 0 and "removed account" in out
    code, _, err = run("account", "remove", "-c", conf, acntid)
    assert code == 1 and f"no account {acntid}" in err


def test_account_add_without_password_source_refuses(db_dsn, tmp_path):
    """Without a terminal or --password-file the command refuses instead of guessing."""
    conf = write_config(tmp_path, db_dsn)
    code, _, err = run("account", "add", "-c", conf, "--email", "a@example.org",
                       "--imap-host", "imap.example.org", input="")
    assert code == 3 and "--password-file" in err


def test_embedded_dsn_starts_one_local_server_for_every_command(tmp_path):
    """[database] dsn = embedded: initdb starts a local server that later commands reuse."""
    import signal
    import time

    data = tmp_path / "run"
    conf = tmp_path / "embedded.conf"
    conf.write_text(f"[database]\ndsn = embedded\n[engine]\ndata_dir = {data}\n")
    pidfile = data / "pgdata" / "postmaster.pid"
    try:
        code, out, err = run("initdb", "-c", str(conf))
        assert code == 0, err
        assert "applied" in out
        server = int(pidfile.read_text().split()[0])
        code, out, _ = run("initdb", "-c", str(conf))
        assert code == 0 and "nothing changed" in out
        assert int(pidfile.read_text().split()[0]) == server
    finally:
        if pidfile.exists():  # the server this test started, by the pid its own file names
            os.kill(int(pidfile.read_text().split()[0]), signal.SIGTERM)
            deadline = time.monotonic() + 20
            while pidfile.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
    assert not pidfile.exists()
