"""The ``email_outbox`` table: every SQL statement the engine runs on it, and the retry schedule.

A row moves QUEUED -> SENDING -> SENT | DEFERRED -> SENDING ... | FAILED
(``states.OutboxState``). The web application only inserts rows; the trigger of
migration 0001 NOTIFYs ``supervisor_mail_outbox`` and a send worker claims the row
with ``FOR UPDATE SKIP LOCKED``, so several workers (and hosts) never take the
same one. A claim sets ``next_attempt_at`` to the claim time plus
``outbox.claim_timeout``: a claimer that died leaves a row that simply comes due
again, and the next claimer sees ``prev_state = 'sending'`` and looks in the Sent
folder before sending again.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg import sql
from psycopg.rows import class_row

from supervisor_mail.states import OutboxState

CHANNEL = "supervisor_mail_outbox"
FIRST_BACKOFF = 300   # seconds before the first retry (Postfix's minimal_backoff_time)
MAX_BACKOFF = 3600    # seconds; the doubling stops at about an hour
JITTER = 0.1          # +-10 %, so messages deferred together do not come back together


def backoff(attempts: int, rand: float | None = None) -> float:
    """Seconds until the next try after ``attempts`` tries: 300, 600, 1200, 2400, 3600, ...

    ``rand`` in [0, 1) picks the jitter (a test passes it; by default it is random).
    """
    base = min(FIRST_BACKOFF * 2 ** max(attempts - 1, 0), MAX_BACKOFF)
    rand = random.random() if rand is None else rand
    return base * (1 - JITTER + 2 * JITTER * rand)


@dataclass
class Claimed:
    """A row this worker holds in state SENDING; ``prev_state`` is what it was before."""

    emobid: int
    acntid: int
    envelope_from: str | None
    recipients: list[str]
    raw: bytes | None
    subject: str | None
    body_text: str | None
    body_html: str | None
    to_addrs: list[str]
    cc_addrs: list[str]
    bcc_addrs: list[str]
    message_id: str | None
    queued_at: datetime
    attempts: int
    prev_state: str

    @property
    def interrupted(self) -> bool:
        """A claim whose claimer vanished: the message may have gone out already."""
        return self.prev_state == OutboxState.SENDING


_CLAIMED = ("o.emobid, o.acntid, o.envelope_from, o.recipients, o.raw, o.subject, o.body_text, "
            "o.body_html, o.to_addrs, o.cc_addrs, o.bcc_addrs, o.message_id, o.queued_at, "
            "o.attempts, next.prev_state")


def claim(conn: psycopg.Connection, name: str, claim_timeout: int, auth_error_retry: int,
          prefer_acntid: int | None = None) -> Claimed | None:
    """Take the most overdue row, of ``prefer_acntid`` first (its SMTP session is open).

    Skips rows other claimers hold, accounts that are disabled, and accounts in
    their SMTP auth-error backoff. One statement, so nothing is left locked.
    """
    with conn.cursor(row_factory=class_row(Claimed)) as cur:
        cur.execute(f"""
            WITH next AS (
                SELECT o.emobid, o.state AS prev_state
                FROM email_outbox o JOIN email_accounts a USING (acntid)
                WHERE o.state IN ('queued', 'deferred', 'sending')
                  AND o.next_attempt_at <= now()
                  AND a.enabled
                  AND (a.smtp_auth_error_at IS NULL
                       OR a.smtp_auth_error_at <= now() - make_interval(secs => %(retry)s))
                ORDER BY o.acntid IS NOT DISTINCT FROM %(prefer)s DESC,
                         o.next_attempt_at, o.emobid
                LIMIT 1
                FOR UPDATE OF o SKIP LOCKED)
            UPDATE email_outbox o
            SET state = 'sending', claimed_by = %(name)s, claimed_at = now(),
                next_attempt_at = now() + make_interval(secs => %(claim)s),
                attempts = o.attempts + 1
            FROM next WHERE o.emobid = next.emobid
            RETURNING {_CLAIMED}""",
                    {"retry": auth_error_retry, "prefer": prefer_acntid, "name": name,
                     "claim": claim_timeout})
        return cur.fetchone()


def release(conn: psycopg.Connection, emobids: list[int], name: str) -> int:
    """Give back claims of ``name`` that never reached the SMTP server (the database failed
    between the claim and the delivery), so they go out now, not after claim_timeout."""
    return conn.execute("""
        UPDATE email_outbox
        SET state = 'queued', claimed_by = NULL, claimed_at = NULL, next_attempt_at = now(),
            attempts = greatest(attempts - 1, 0)
        WHERE emobid = ANY (%s) AND state = 'sending' AND claimed_by = %s""",
                        (emobids, name)).rowcount


def set_message_id(conn: psycopg.Connection, emobid: int, message_id: str) -> None:
    """Store the Message-ID before the first attempt, so every resend carries the same one."""
    conn.execute("UPDATE email_outbox SET message_id = %s WHERE emobid = %s",
                 (message_id, emobid))


def mark_sent(conn: psycopg.Connection, emobid: int, reply: str,
              refused: dict[str, str] | None = None) -> None:
    """SENDING -> SENT, with the server's reply and any recipients it refused.

    Not fenced on the claim: the message went out, whoever holds the row now.
    """
    refused = refused or {}
    conn.execute("""
        UPDATE email_outbox SET state = 'sent', sent_at = now(), smtp_reply = %s,
            refused_recipients = %s, last_error = %s
        WHERE emobid = %s""",
                 (reply, list(refused) or None,
                  "; ".join(f"refused {a}: {r}" for a, r in refused.items()) or None, emobid))


def mark_filed(conn: psycopg.Connection, emobid: int, emfdid: int | None,
               uid: int | None) -> None:
    """Link a sent row to its copy in the local Sent folder."""
    conn.execute("UPDATE email_outbox SET sent_emfdid = %s, sent_uid = %s WHERE emobid = %s",
                 (emfdid, uid, emobid))


def fail(conn: psycopg.Connection, emobid: int, name: str, error: str,
         reply: str | None = None) -> None:
    """SENDING -> FAILED for good: bad input, or a 5xx the user has to read."""
    conn.execute("""
        UPDATE email_outbox SET state = 'failed', last_error = %s, smtp_reply = %s
        WHERE emobid = %s AND state = 'sending' AND claimed_by = %s""",
                 (error, reply, emobid, name))


def defer(conn: psycopg.Connection, emobid: int, name: str, error: str, reply: str | None,
          delay: float, max_lifetime: int) -> tuple[str, datetime] | None:
    """SENDING -> DEFERRED for ``delay`` seconds, or FAILED once ``max_lifetime`` is over.

    The last try is at the end of the lifetime, however long the backoff. Returns
    the new state and the retry time, or None when the claim was lost meanwhile.
    """
    row = conn.execute("""
        UPDATE email_outbox SET
            state = CASE WHEN queued_at + make_interval(secs => %(life)s) <= now()
                         THEN 'failed' ELSE 'deferred' END,
            next_attempt_at = LEAST(now() + make_interval(secs => %(delay)s),
                                    queued_at + make_interval(secs => %(life)s)),
            last_error = CASE WHEN queued_at + make_interval(secs => %(life)s) <= now()
                              THEN 'gave up after ' || attempts || ' attempts: ' || %(error)s
                              ELSE %(error)s END,
            smtp_reply = %(reply)s
        WHERE emobid = %(id)s AND state = 'sending' AND claimed_by = %(name)s
        RETURNING state, next_attempt_at""",
                       {"life": max_lifetime, "delay": delay, "error": error, "reply": reply,
                        "id": emobid, "name": name}).fetchone()
    return (row[0], row[1]) if row else None


def defer_account(conn: psycopg.Connection, acntid: int, emobid: int, error: str,
                  retry: int, max_lifetime: int) -> int:
    """Defer every waiting message of an account whose SMTP login failed, and ``emobid``.

    They come back after ``retry`` seconds (``sync.auth_error_retry``), or at once
    when the credentials change (migration 0003). Returns how many were deferred.
    """
    return conn.execute("""
        UPDATE email_outbox SET
            state = CASE WHEN queued_at + make_interval(secs => %(life)s) <= now()
                         THEN 'failed' ELSE 'deferred' END,
            next_attempt_at = now() + make_interval(secs => %(retry)s),
            last_error = %(error)s
        WHERE acntid = %(acntid)s AND (state IN ('queued', 'deferred') OR emobid = %(id)s)""",
                        {"life": max_lifetime, "retry": retry, "error": error,
                         "acntid": acntid, "id": emobid}).rowcount


WAITING = (OutboxState.QUEUED, OutboxState.DEFERRED, OutboxState.SENDING)


@dataclass
class Counts:
    """Rows per state, and the age in seconds of the oldest row still waiting to go out."""

    by_state: dict[str, int]
    oldest_waiting_age: float | None


def counts(conn: psycopg.Connection, acntid: int | None = None,
           waiting_only: bool = False) -> Counts:
    """Rows per state (of one account, or all); ``waiting_only`` counts only the states of
    ``WAITING``, which the partial index covers: sent rows pile up for years, and the
    planner reads this at every pass."""
    waiting = sql.SQL(", ").join(sql.Literal(state.value) for state in WAITING)
    where = sql.SQL("state IN ({})").format(waiting) if waiting_only else sql.SQL("true")
    rows = conn.execute(sql.SQL("""
        SELECT state, count(*),
               extract(epoch FROM now() - min(queued_at) FILTER (WHERE state IN ({waiting})))
                   ::float8
        FROM email_outbox
        WHERE {where} AND (%(acntid)s::bigint IS NULL OR acntid = %(acntid)s)
        GROUP BY state""").format(where=where, waiting=waiting), {"acntid": acntid}).fetchall()
    by_state = {state.value: 0 for state in (WAITING if waiting_only else OutboxState)}
    oldest = None
    for state, n, age in rows:
        by_state[state] = n
        if age is not None:
            oldest = max(oldest or 0.0, age)
    return Counts(by_state, oldest)


def queue(conn: psycopg.Connection, acntid: int, **columns: object) -> int:
    """Insert a row as the web application does (README, "The outbox"); returns its emobid.

    For the demo and the tests: the application writes the same INSERT in its own code.
    """
    names = list(columns)
    row = conn.execute(
        f"INSERT INTO email_outbox (acntid{''.join(', ' + n for n in names)}) "
        f"VALUES (%s{', %s' * len(names)}) RETURNING emobid",
        [acntid, *columns.values()]).fetchone()
    return row[0]

