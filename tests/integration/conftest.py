"""Real IMAP and SMTP servers for the integration tests.

Every test that uses ``imap_server`` (or ``imap_account``/``mailbox``) runs once
per IMAP server this machine has: Dovecot where it starts, pymap always. Each
server is started once per session; each test gets a fresh account on it, so no
test sees another's mail.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from supervisor_mail.embedded.engine import Engine
from supervisor_mail.embedded.imap import Account, ImapServer, available_servers, make_server
from supervisor_mail.embedded.imap_admin import Mailbox
from supervisor_mail.embedded.smtp import SmtpSink

IMAP_SERVERS = available_servers()


def pytest_configure(config: pytest.Config) -> None:
    # The sink requires AUTH without TLS on purpose; aiosmtpd warns about it each time.
    config.addinivalue_line(
        "filterwarnings", "ignore:Requiring AUTH while not requiring TLS:UserWarning")


def pytest_collection_finish(session: pytest.Session) -> None:
    # Not pytest_report_header: pytest asks only the conftests it loads before
    # collecting, and this one is loaded during collection when the whole suite runs.
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and session.config.option.verbose >= 0:
        reporter.write_line(f"IMAP servers: {', '.join(IMAP_SERVERS)}")


@pytest.fixture(scope="session", params=IMAP_SERVERS)
def imap_server(request: pytest.FixtureRequest) -> Iterator[ImapServer]:
    """A running IMAP server (plaintext), shared by the session: one parameter per server."""
    with make_server(request.param) as server:
        yield server


@pytest.fixture
def imap_account(imap_server: ImapServer) -> Account:
    """A fresh account ``(server, login, password)`` on ``imap_server``."""
    return imap_server.new_account()


@pytest.fixture
def mailbox(imap_account: Account) -> Iterator[Mailbox]:
    """A logged-in ``Mailbox`` on ``imap_account``, logged out after the test."""
    with Mailbox.for_account(imap_account) as mailbox:
        yield mailbox


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    """A fresh SMTP sink (no AUTH, no TLS) for one test."""
    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def engine_factory(tmp_path, db_dsn):
    """``engine_factory(**settings)``: a real engine (not yet started) on this test's
    database; every engine made is stopped at the end and must leave no process behind."""
    engines: list[Engine] = []

    def make(**changes) -> Engine:
        root = tmp_path / f"e{len(engines)}"
        root.mkdir()
        engines.append(Engine(root, db_dsn, **changes))
        return engines[-1]

    yield make
    for engine in engines:
        engine.__exit__(None, None, None)
        assert engine.leftovers() == [], "engine processes left behind"
