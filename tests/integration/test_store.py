"""The schema on real PostgreSQL: migrations, look-alike refusal, session settings."""

import psycopg
import pytest

from supervisor_mail import accounts, store
from supervisor_mail.errors import DatabaseError, SchemaError


def test_migrations_apply_then_change_nothing(empty_dsn, make_cfg):
    """initdb applies every migration once; a second run changes nothing."""
    cfg = make_cfg(empty_dsn)
    with store.connect(cfg, "test") as conn:
        first = store.initdb(conn)
        assert first == [f"{m.version:04d}_{m.name}" for m in store.migrations()]
        before = store.fingerprint(conn)
        assert store.initdb(conn) == []
        assert store.fingerprint(conn) == before
        assert store.applied_versions(conn) == [m.version for m in store.migrations()]
        for table in store.engine_tables():
            assert conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0] is not None


def test_lookalike_table_is_refused(empty_dsn, make_cfg):
    """A table named like ours that initdb did not create stops initdb, untouched."""
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE email_accounts (id int, note text)")
        conn.execute("INSERT INTO email_accounts VALUES (1, 'the application''s own')")
    cfg = make_cfg(empty_dsn)
    with store.connect(cfg, "test") as conn:
        with pytest.raises(SchemaError, match="table email_accounts already exists but was not "
                                              "created by supervisor_mail"):
            store.initdb(conn)
        note = conn.execute("SELECT note FROM email_accounts").fetchone()[0]
        assert note == "the application's own"
        assert conn.execute("SELECT to_regclass('email_folders')").fetchone()[0] is None


def test_raw_column_is_stored_external(db):
    """Message bodies skip pglz compression, which halves bulk-insert throughput."""
    storage = db.execute("""SELECT attstorage FROM pg_attribute
                            WHERE attrelid = 'email_messages'::regclass AND attname = 'raw'""")
    assert storage.fetchone()[0] == "e"


def test_sessions_carry_timeouts_and_name(cfg):
    """Every session sets statement_timeout, lock_timeout and an application_name."""
    with store.connect(cfg, "sync", 3) as conn:
        assert conn.execute("SHOW statement_timeout").fetchone()[0] == "30s"
        assert conn.execute("SHOW lock_timeout").fetchone()[0] == "10s"
        assert conn.execute("SHOW application_name").fetchone()[0] == "supervisor_mail sync 3"


def test_unreachable_database_is_one_clear_line(make_cfg, tmp_path):
    """A DSN that leads nowhere gives a DatabaseError naming the setting, password masked."""
    cfg = make_cfg(f"host={tmp_path} port=1 dbname=x password=hunter2")
    with pytest.raises(DatabaseError) as err:
        store.connect(cfg, "test")
    assert "check [database] dsn" in str(err.value)
    assert "hunter2" not in str(err.value)


def test_outbox_insert_notifies(db_dsn):
    """A new outbox row raises a NOTIFY on the channel the send workers listen to."""
    with psycopg.connect(db_dsn, autocommit=True) as listener, \
            psycopg.connect(db_dsn, autocommit=True) as app:
        listener.execute("LISTEN supervisor_mail_outbox")
        acntid = accounts.add(app, email="a@example.org", smtp_host="127.0.0.1")
        row = app.execute("INSERT INTO email_outbox (acntid, recipients, raw) "
                          "VALUES (%s, %s, %s) RETURNING emobid",
                          (acntid, ["b@example.org"], b"Subject: x\r\n\r\nbody\r\n")).fetchone()
        notes = list(listener.notifies(timeout=2, stop_after=1))
    assert [(n.channel, n.payload) for n in notes] == [("supervisor_mail_outbox", str(row[0]))]


def test_changed_credentials_rearm_the_login(db):
    """Changing an account's IMAP password clears its IMAP auth error, not its SMTP one."""
    acntid = accounts.add(db, email="a@example.org", imap_host="imap.example.org",
                          imap_password="old", smtp_host="smtp.example.org", smtp_password="old")
    accounts.set_auth_error(db, acntid, "imap", "[AUTHENTICATIONFAILED] bad")
    accounts.set_auth_error(db, acntid, "smtp", "535 bad")
    accounts.update(db, acntid, imap_password="new")
    account = accounts.get(db, acntid)
    assert account.imap_auth_error_at is None and account.imap_auth_error is None
    assert account.smtp_auth_error == "535 bad"
    assert account.imap_port == 993 and account.smtp_port == 587
    assert "old" not in repr(account)
