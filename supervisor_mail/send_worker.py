"""A send worker: waits on LISTEN, claims outbox rows, delivers them, files the Sent copy.

The engine runs one per send slot, after the fork (``worker.SendProcess``)::

    SendWorker(cfg, slot=9, beat=process.beat, should_stop=process.should_stop,
               name="127.0.0.1/send 9/4711").run()

- ``beat(phase, progress)`` is called on every turn of the loop, idle ("idle") or
  busy ("[53,-] sent", "[53,-] filing", "[53,-] checking sent"), from this thread
  only; ``progress`` counts the messages handled. It may raise to end the worker
  (a dead parent). A busy beat comes after a delivery, not before, so the state DB
  write is never between a NOTIFY and the SMTP transaction.
- ``should_stop()`` is checked between messages and while waiting: a stop never
  cuts a delivery in half.
- ``name`` goes into ``email_outbox.claimed_by``: host, slot and pid, so a claim
  says who holds it.

Outcomes (README, "The outbox"): 2xx -> sent; 4xx, timeouts, connection errors
-> deferred on the backoff schedule until ``outbox.max_lifetime``, then failed;
5xx and bad input -> failed with the reason; a refused SMTP login -> the account's
SMTP auth error set and all its messages deferred for ``sync.auth_error_retry``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import psycopg

from supervisor_mail import accounts, metrics, outbox, store
from supervisor_mail.accounts import Account
from supervisor_mail.compose import BadMessage, Outgoing, Parts, compose
from supervisor_mail.config import Config
from supervisor_mail.errors import AuthError, ServerError
from supervisor_mail.logs import where
from supervisor_mail.sent_copy import SentFolder, record
from supervisor_mail.smtp_client import Delivery, Refused, Session, Stale, TooLarge, settings_key
from supervisor_mail.state import StateDB

log = logging.getLogger("supervisor_mail.outbox")

WAIT_SLICE = 1.0      # seconds; longest wait on LISTEN between beats and stop checks
SESSION_IDLE = 10.0   # seconds an unused SMTP or IMAP session is kept open
HANDOFF = 0.05        # seconds a new row waits for its own worker before the others look
# Claims this process holds that never reached the SMTP server, kept across the restarts
# of the loop after a database error so the next loop gives them back first.
UNSENT: set[int] = set()


class SendWorker:
    """The LISTEN/claim/deliver loop of one send slot (see the module's docstring)."""

    def __init__(self, cfg: Config, slot: int, beat: Callable[[str, int], None],
                 should_stop: Callable[[], bool], name: str):
        self.cfg = cfg
        self.slot = slot
        self.beat = beat
        self.should_stop = should_stop
        self.name = name
        self.handled = 0
        self.conn: psycopg.Connection | None = None
        self.listener: psycopg.Connection | None = None
        self.smtp: Session | None = None
        self.sent_folder: SentFolder | None = None
        self.statedb = StateDB.for_config(cfg)  # the metrics counters; opened at first use
        self._last_used = time.monotonic()
        self.reached_smtp = False

    def run(self) -> None:
        """Open this process's own connections, then work until ``should_stop()``."""
        self.listener = store.connect(self.cfg, "send listen", self.slot)
        self.listener.execute(f"LISTEN {outbox.CHANNEL}")
        self.conn = store.connect(self.cfg, "send", self.slot)
        if UNSENT:
            outbox.release(self.conn, sorted(UNSENT), self.name)
            UNSENT.clear()
        try:
            self.loop()
        finally:
            self.close_sessions()
            self.conn.close()
            self.listener.close()

    def loop(self) -> None:
        poll = self.cfg.outbox.poll_interval
        claim, last_poll = True, 0.0
        while not self.should_stop():
            if claim or time.monotonic() - last_poll >= poll:
                last_poll = time.monotonic()
                self.drain()
            self.beat("idle", self.handled)
            if time.monotonic() - self._last_used > SESSION_IDLE:
                self.close_sessions()
            claim = self.wait(min(WAIT_SLICE, max(poll - (time.monotonic() - last_poll), 0)))

    def wait(self, timeout: float) -> bool:
        """Wait on LISTEN up to ``timeout``; True when it is time to claim.

        A NOTIFY for a new row reaches every send worker. The row's own worker
        (``emobid`` modulo the send slots) claims at once; the others keep waiting
        and claim ``HANDOFF`` later (the row is gone by then unless its worker is
        busy or missing), so a message costs one claim query and one beat, not one
        a worker. The generator is left before any query: it holds the connection,
        and a query inside it would deadlock.
        """
        if not self.cfg.outbox.enabled:
            time.sleep(timeout)
            return False
        claim_at, deadline = float("inf"), time.monotonic() + timeout
        while True:
            left = min(deadline, claim_at) - time.monotonic()
            if left <= 0:
                return claim_at <= time.monotonic()
            mine = False
            for notify in self.listener.notifies(timeout=left, stop_after=1):
                mine = self.owns(notify.payload)
                claim_at = min(claim_at, time.monotonic() + HANDOFF)
            if mine:
                return True

    def owns(self, payload: str) -> bool:
        if not payload.isdigit():
            return True  # an account re-armed, or an unknown sender: everyone looks
        slots = self.cfg.engine.send_workers
        return int(payload) % slots == (self.slot - self.cfg.sync_workers) % slots

    def drain(self) -> None:
        """Claim and deliver due rows one at a time until none is left or a stop is asked."""
        while self.cfg.outbox.enabled and not self.should_stop():
            row = outbox.claim(self.conn, self.name, self.cfg.outbox.claim_timeout,
                               self.cfg.sync.auth_error_retry,
                               self.smtp.key[0] if self.smtp else None)
            if row is None:
                return
            self.reached_smtp = False
            try:
                self.handle(row)
            except psycopg.OperationalError:
                # The database is gone or locked: the loop is restarted. A claim that never
                # reached the SMTP server is given back then (a sent one waits for
                # claim_timeout and the Sent-folder check, so it is never sent twice).
                if not self.reached_smtp:
                    UNSENT.add(row.emobid)
                raise
            except Exception as exc:  # a bug must not stop the queue: defer and go on
                log.exception("outbox message %d: internal error, deferred", row.emobid,
                              extra=where(row.acntid))
                self.defer(row, None, f"internal error: {exc}", None)
            self.handled += 1
            self._last_used = time.monotonic()
            self.beat(f"[{row.acntid},-] sent", self.handled)

    def handle(self, row: outbox.Claimed) -> None:
        account = accounts.get(self.conn, row.acntid)
        try:
            out = compose(self.parts(row, account))
        except BadMessage as exc:
            self.fail(row, None, f"refused, not sent: {exc}")
            return
        if out.message_id != row.message_id:
            outbox.set_message_id(self.conn, row.emobid, out.message_id)
        if row.interrupted and account.has_imap and self.found_in_sent(row, account, out):
            return
        started = time.monotonic()
        self.reached_smtp = True
        try:
            delivery = self.transmit(account, out)
        except AuthError as exc:
            self.auth_failed(row, account, str(exc))
        except TooLarge as exc:
            self.fail(row, out, f"refused, not sent: {exc}")
        except Refused as exc:
            if exc.permanent:
                self.fail(row, out, str(exc), exc.reply)
            else:
                self.defer(row, out, str(exc), exc.reply)
        except ServerError as exc:  # network, TLS required, certificate, "try later"
            self.defer(row, out, str(exc), None)
        else:
            try:
                outbox.mark_sent(self.conn, row.emobid, delivery.reply, delivery.refused)
            except psycopg.Error as exc:
                self.unrecorded(row, account, out, exc)
                return
            self.log_sent(row, out, delivery, time.monotonic() - started)
            metrics.count_send(self.statedb, "sent", time.monotonic() - started)
            if account.smtp_auth_error_at is not None:
                accounts.clear_auth_error(self.conn, account.acntid, "smtp")
            if account.has_imap:
                self.file(row, account, out)

    def unrecorded(self, row: outbox.Claimed, account: Account, out: Outgoing,
                   exc: psycopg.Error) -> None:
        """The server took the message but PostgreSQL did not take 'sent'. The row stays
        SENDING, so no deferral can send it again; the copy goes to Sent all the same, and
        whoever takes the expired claim finds it there and marks it sent."""
        log.error("sent message %s but could not record it (%s); it is marked sent when its "
                  "claim expires and the Sent folder shows it", out.message_id,
                  " ".join(str(exc).split()), extra=where(row.acntid))
        if account.has_imap:
            try:
                self.sent_session(account).append(out)
            except ServerError as imap_exc:
                self.close_sent_folder()
                log.error("could not file %s in Sent either (%s): it will be sent again",
                          out.message_id, imap_exc, extra=where(row.acntid))
        if self.conn.broken:
            raise exc  # the session is gone: the engine reconnects this worker

    def parts(self, row: outbox.Claimed, account: Account) -> Parts:
        return Parts(
            sender=row.envelope_from or account.email, recipients=row.recipients, raw=row.raw,
            subject=row.subject, body_text=row.body_text, body_html=row.body_html,
            to_addrs=row.to_addrs, cc_addrs=row.cc_addrs, bcc_addrs=row.bcc_addrs,
            message_id=row.message_id, from_name=account.name, date=row.queued_at)

    def transmit(self, account: Account, out: Outgoing) -> Delivery:
        """Send over the account's kept session, or a new one; a closed kept one is replaced."""
        if self.smtp is not None and self.smtp.key != settings_key(account):
            self.close_smtp()
        for reopen in (False, True):
            if self.smtp is None:
                self.smtp = Session(self.cfg, account)
            try:
                return self.smtp.send(out)
            except Stale:
                self.close_smtp()
                if reopen:
                    raise
            except ServerError as exc:
                if not isinstance(exc, (Refused, TooLarge)):
                    self.close_smtp()  # the session is in an unknown state
                raise
        raise AssertionError("unreachable: the second try returns or raises")

    def log_sent(self, row: outbox.Claimed, out: Outgoing, delivery: Delivery,
                 seconds: float) -> None:
        accepted = len(out.recipients) - len(delivery.refused)
        refused = "".join(f", refused {a}: {r}" for a, r in delivery.refused.items())
        log.info("sent message %s to %d recipient%s in %.1fs%s", out.message_id, accepted,
                 "" if accepted == 1 else "s", seconds, refused, extra=where(row.acntid))

    def fail(self, row: outbox.Claimed, out: Outgoing | None, error: str,
             reply: str | None = None) -> None:
        outbox.fail(self.conn, row.emobid, self.name, error, reply)
        log.error("failed message %s (outbox %d): %s", _ident(row, out), row.emobid, error,
                  extra=where(row.acntid))
        metrics.count_send(self.statedb, "failed")  # after the log line, which tests await

    def defer(self, row: outbox.Claimed, out: Outgoing | None, error: str,
              reply: str | None) -> None:
        result = outbox.defer(self.conn, row.emobid, self.name, error, reply,
                              outbox.backoff(row.attempts), self.cfg.outbox.max_lifetime)
        if result is None:
            log.warning("outbox %d was claimed by another worker meanwhile", row.emobid,
                        extra=where(row.acntid))
        elif result[0] == "failed":
            log.error("failed message %s (outbox %d) after %d attempts: %s", _ident(row, out),
                      row.emobid, row.attempts, error, extra=where(row.acntid))
        else:
            log.warning("deferred message %s (outbox %d) until %s (attempt %d): %s",
                        _ident(row, out), row.emobid, result[1].astimezone().strftime("%H:%M:%S"),
                        row.attempts, error, extra=where(row.acntid))
        if result is not None:
            metrics.count_send(self.statedb, result[0])  # deferred, or failed: too old

    def auth_failed(self, row: outbox.Claimed, account: Account, error: str) -> None:
        """Back the account's SMTP off (IMAP goes on) and defer all its waiting messages."""
        retry = self.cfg.sync.auth_error_retry
        with self.conn.transaction():
            accounts.set_auth_error(self.conn, account.acntid, "smtp", error)
            deferred = outbox.defer_account(
                self.conn, account.acntid, row.emobid,
                f"{error}; retried in {retry}s or as soon as the SMTP credentials change",
                retry, self.cfg.outbox.max_lifetime)
        log.error("SMTP login failed, %d message(s) deferred for %ds: %s", deferred, retry,
                  error, extra=where(account.acntid))
        metrics.count_send(self.statedb, "deferred")

    def found_in_sent(self, row: outbox.Claimed, account: Account, out: Outgoing) -> bool:
        """After a claimer died: if our APPEND put the message in Sent, it went out already."""
        self.beat(f"[{row.acntid},-] checking sent", self.handled)
        try:
            filed = self.sent_session(account).find(out.message_id)
        except ServerError as exc:
            log.warning("cannot look for %s in Sent (%s): sending it again", out.message_id, exc,
                        extra=where(row.acntid))
            self.close_sent_folder()
            return False
        if filed is None:
            return False
        with self.conn.transaction():
            outbox.mark_sent(self.conn, row.emobid, "not sent again: found in the Sent folder "
                                                    "after an interrupted delivery")
            outbox.mark_filed(self.conn, row.emobid, *record(self.conn, account.acntid, filed))
        log.info("message %s of an interrupted delivery is in Sent: marked sent, not resent",
                 out.message_id, extra=where(row.acntid))
        return True

    def file(self, row: outbox.Claimed, account: Account, out: Outgoing) -> None:
        """APPEND the copy to Sent; a failure is logged and never causes a second send."""
        self.beat(f"[{row.acntid},-] filing", self.handled)
        try:
            session = self.sent_session(account)
            filed = session.append(out)
            outbox.mark_filed(self.conn, row.emobid,
                              *record(self.conn, account.acntid, filed, session))
        except ServerError as exc:
            self.close_sent_folder()
            log.warning("sent message %s but could not file it in Sent: %s", out.message_id,
                        exc, extra=where(row.acntid))
        except psycopg.OperationalError:
            raise
        except Exception:  # the message is out and recorded: nothing here may change that
            self.close_sent_folder()
            log.exception("sent message %s but could not file it in Sent", out.message_id,
                          extra=where(row.acntid))

    def sent_session(self, account: Account) -> SentFolder:
        if self.sent_folder is not None and self.sent_folder.key != SentFolder.key_of(account):
            self.close_sent_folder()
        if self.sent_folder is None:
            self.sent_folder = SentFolder(self.cfg, account)
        return self.sent_folder

    def close_smtp(self) -> None:
        if self.smtp is not None:
            self.smtp.close()
            self.smtp = None

    def close_sent_folder(self) -> None:
        if self.sent_folder is not None:
            self.sent_folder.close()
            self.sent_folder = None

    def close_sessions(self) -> None:
        self.close_smtp()
        self.close_sent_folder()


def _ident(row: outbox.Claimed, out: Outgoing | None) -> str:
    return (out.message_id if out else row.message_id) or "(no Message-ID yet)"

