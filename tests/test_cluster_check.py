"""The IMAP server log reading of the cluster checks (embedded/cluster_check), on log text
as Dovecot writes it: sessions, their order, and overlaps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from supervisor_mail.embedded import cluster_check


@dataclass
class LoggedServer:
    """What ``sessions`` reads of a server: its name and its log file."""

    name: str
    log_path: Path


def login(user: str, key: str) -> str:
    return (f"Dec 04 12:28:23 imap-login: Info: Login: user=<{user}>, method=PLAIN, "
            f"rip=127.0.0.1, lip=127.0.0.1, mpid=22413, secured, session=<{key}>")


def logout(user: str, key: str) -> str:
    return (f"Dec 04 12:28:23 imap({user})<22413><{key}>: Info: Disconnected: Logged out "
            "in=51 out=616")


def sessions(tmp_path: Path, lines: list[str]) -> list[cluster_check.Session]:
    path = tmp_path / "dovecot.log"
    path.write_text("\n".join(lines) + "\n")
    return cluster_check.sessions(LoggedServer("dovecot", path))


def test_a_session_logged_ended_before_its_login_is_an_ended_session(tmp_path):
    """Dovecot's log service may write a short session's end before its login: it spans
    both lines and does not overlap the user's next session."""
    found = sessions(tmp_path, [logout("u1", "A"), login("u1", "A"),
                                login("u1", "B"), logout("u1", "B")])
    assert [(s.key, s.start, s.end) for s in found] == [("A", 0, 1), ("B", 2, 3)]
    assert cluster_check.overlapping_users(found) == set()


def test_sessions_open_at_once_overlap_and_an_unended_one_stays_open(tmp_path):
    found = sessions(tmp_path, [login("u1", "A"), login("u1", "B"), logout("u1", "A"),
                                login("u2", "C")])
    assert [(s.key, s.end) for s in found] == [("A", 2), ("B", None), ("C", None)]
    assert cluster_check.overlapping_users(found) == {"u1"}
