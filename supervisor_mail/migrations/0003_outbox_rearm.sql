-- The outbox: wake the send workers whenever a row becomes due outside the INSERT
-- trigger of 0001, so nothing waits for the safety-net poll.

-- New SMTP credentials (0001's trigger clears smtp_auth_error_at) or a login that
-- works again re-arm the account's deferred messages at once. No "UPDATE OF column"
-- here: a column changed by a BEFORE trigger does not fire those.
CREATE FUNCTION email_outbox_rearm_account() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE email_outbox SET next_attempt_at = now()
        WHERE acntid = NEW.acntid AND state = 'deferred' AND next_attempt_at > now();
    PERFORM pg_notify('supervisor_mail_outbox', 'account ' || NEW.acntid);
    RETURN NULL;
END $$;
CREATE TRIGGER email_outbox_rearm_account AFTER UPDATE ON email_accounts
    FOR EACH ROW WHEN (OLD.smtp_auth_error_at IS NOT NULL AND NEW.smtp_auth_error_at IS NULL)
    EXECUTE FUNCTION email_outbox_rearm_account();

-- The application re-queues a deferred or failed message ("send again") by setting
-- its state back to 'queued'.
CREATE TRIGGER email_outbox_requeued AFTER UPDATE OF state ON email_outbox
    FOR EACH ROW WHEN (NEW.state = 'queued' AND OLD.state IS DISTINCT FROM 'queued')
    EXECUTE FUNCTION email_outbox_notify();
