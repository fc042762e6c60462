-- The engine's tables in the application's database.
-- Every table carries the comment 'supervisor_mail', which is how initdb tells its
-- own tables from look-alikes that it must not adopt.

CREATE TABLE email_user_activity (
    user_id      bigint PRIMARY KEY,
    last_active  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE email_user_activity IS
    'supervisor_mail: the web application''s users'' last activity; decides "logged in"';

CREATE TABLE email_accounts (
    acntid               bigserial PRIMARY KEY,
    owner_id             bigint,
    name                 text NOT NULL DEFAULT '',
    email                text NOT NULL,
    enabled              boolean NOT NULL DEFAULT true,
    imap_host            text,
    imap_port            integer CHECK (imap_port BETWEEN 1 AND 65535),
    imap_security        text NOT NULL DEFAULT 'tls'
                         CHECK (imap_security IN ('tls', 'starttls', 'plain')),
    imap_login           text,
    imap_password        text,
    imap_auth_error_at   timestamptz,
    imap_auth_error      text,
    smtp_host            text,
    smtp_port            integer CHECK (smtp_port BETWEEN 1 AND 65535),
    smtp_security        text NOT NULL DEFAULT 'starttls'
                         CHECK (smtp_security IN ('tls', 'starttls', 'plain')),
    smtp_login           text,
    smtp_password        text,
    smtp_auth_error_at   timestamptz,
    smtp_auth_error      text,
    last_error           text,
    last_error_at        timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE email_accounts IS 'supervisor_mail: mail accounts, IMAP and SMTP';

-- Changed credentials re-arm a login at once, whoever changed them (the web
-- application or `account` commands): the auth-error backoff is cleared here.
CREATE FUNCTION email_accounts_rearm() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.imap_login IS DISTINCT FROM OLD.imap_login
       OR NEW.imap_password IS DISTINCT FROM OLD.imap_password
       OR NEW.imap_host IS DISTINCT FROM OLD.imap_host THEN
        NEW.imap_auth_error_at := NULL;
        NEW.imap_auth_error := NULL;
    END IF;
    IF NEW.smtp_login IS DISTINCT FROM OLD.smtp_login
       OR NEW.smtp_password IS DISTINCT FROM OLD.smtp_password
       OR NEW.smtp_host IS DISTINCT FROM OLD.smtp_host THEN
        NEW.smtp_auth_error_at := NULL;
        NEW.smtp_auth_error := NULL;
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END $$;
CREATE TRIGGER email_accounts_rearm BEFORE UPDATE ON email_accounts
    FOR EACH ROW EXECUTE FUNCTION email_accounts_rearm();

CREATE TABLE email_folders (
    emfdid            bigserial PRIMARY KEY,
    acntid            bigint NOT NULL REFERENCES email_accounts ON DELETE CASCADE,
    server_name       text NOT NULL,          -- as the server spells it (modified UTF-7)
    display_name      text NOT NULL,          -- decoded for people
    delimiter         text,
    role              text CHECK (role IN ('inbox', 'sent', 'drafts', 'trash', 'junk', 'archive')),
    priority          text NOT NULL DEFAULT 'lo' CHECK (priority IN ('hi', 'lo', 'off')),
    user_priority     text CHECK (user_priority IN ('hi', 'lo', 'off')),  -- the user's override
    uidvalidity       bigint,
    last_uid          bigint NOT NULL DEFAULT 0,  -- the sync cursor: highest UID stored
    highestmodseq     bigint,
    last_recent_sync  timestamptz,
    last_full_sync    timestamptz,
    last_error        text,
    last_error_at     timestamptz,
    gone_at           timestamptz,               -- no longer on the server
    created_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (acntid, server_name)
);
COMMENT ON TABLE email_folders IS 'supervisor_mail: IMAP folders and their sync cursors';

CREATE TABLE email_messages (
    emsgid         bigserial PRIMARY KEY,
    emfdid         bigint NOT NULL REFERENCES email_folders ON DELETE CASCADE,
    uidvalidity    bigint NOT NULL,
    uid            bigint NOT NULL,
    message_id     text,
    subject        text,
    from_addr      text,
    to_addrs       text,
    cc_addrs       text,
    sent_date      timestamptz,
    internaldate   timestamptz,
    size           bigint,
    flags          text[] NOT NULL DEFAULT '{}',
    modseq         bigint,
    headers        text,                     -- the header block, decoded, for display
    raw            bytea,                    -- byte-exact BODY[] as the server returned it
    skipped_reason text,                     -- why raw is headers only or missing
    deleted_at     timestamptz,              -- expunged on the server
    retired_at     timestamptz,              -- its UIDVALIDITY was replaced
    stored_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (emfdid, uidvalidity, uid)
);
-- Measured: pglz compression halves bulk-insert throughput for about 11 % space.
ALTER TABLE email_messages ALTER COLUMN raw SET STORAGE EXTERNAL;
CREATE INDEX email_messages_message_id ON email_messages (emfdid, message_id);
COMMENT ON TABLE email_messages IS 'supervisor_mail: messages, keyed by folder, UIDVALIDITY, UID';

CREATE TABLE email_outbox (
    emobid              bigserial PRIMARY KEY,
    acntid              bigint NOT NULL REFERENCES email_accounts ON DELETE CASCADE,
    envelope_from       text,                -- default: the account's address
    recipients          text[] NOT NULL DEFAULT '{}',  -- envelope recipients, Bcc included
    raw                 bytea,               -- a complete RFC 5322 message, or NULL to build
    subject             text,                -- parts to build a message from when raw is NULL
    body_text           text,
    body_html           text,
    to_addrs            text[] NOT NULL DEFAULT '{}',
    cc_addrs            text[] NOT NULL DEFAULT '{}',
    bcc_addrs           text[] NOT NULL DEFAULT '{}',
    message_id          text,
    state               text NOT NULL DEFAULT 'queued'
                        CHECK (state IN ('queued', 'sending', 'sent', 'deferred', 'failed')),
    queued_at           timestamptz NOT NULL DEFAULT now(),
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    attempts            integer NOT NULL DEFAULT 0,
    claimed_by          text,
    claimed_at          timestamptz,
    sent_at             timestamptz,
    smtp_reply          text,
    last_error          text,
    refused_recipients  text[],
    sent_emfdid         bigint REFERENCES email_folders ON DELETE SET NULL,
    sent_uid            bigint
);
CREATE INDEX email_outbox_due ON email_outbox (next_attempt_at)
    WHERE state IN ('queued', 'deferred', 'sending');
COMMENT ON TABLE email_outbox IS 'supervisor_mail: messages queued by the application for delivery';

-- A new row wakes the send workers at once (they LISTEN on this channel).
CREATE FUNCTION email_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('supervisor_mail_outbox', NEW.emobid::text);
    RETURN NULL;
END $$;
CREATE TRIGGER email_outbox_notify AFTER INSERT ON email_outbox
    FOR EACH ROW EXECUTE FUNCTION email_outbox_notify();
