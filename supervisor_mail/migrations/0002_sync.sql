-- IMAP synchronization (issue 3).

-- After a UIDVALIDITY change the folder's old rows are retired, and each message of
-- the recreated mailbox looks for a retired row with its Message-ID and size to take
-- over (so the web application's references survive): this keeps that lookup, and
-- the "any retired rows left?" test before it, off the folder's full index.
CREATE INDEX email_messages_retired ON email_messages (emfdid, message_id)
    WHERE retired_at IS NOT NULL AND deleted_at IS NULL;
