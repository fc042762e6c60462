-- What the planner needs beyond the initial schema.

-- When the account's folder list was last read from the server (LIST). NULL: never,
-- so the planner queues a discovery task first; after that it is repeated every
-- sync.hi_full_interval so folders created on the server appear.
ALTER TABLE email_accounts ADD COLUMN folders_listed_at timestamptz;
COMMENT ON COLUMN email_accounts.folders_listed_at IS
    'supervisor_mail: when the folder list was last read from the IMAP server';

-- The planner's due query (planner.candidates_query) never reads the whole folder
-- table: the lo folders whose daily sync is due are a range of the first index, and
-- the hi folders (a fifth or so of all) are read through the second.
CREATE INDEX email_folders_lo_due ON email_folders (last_full_sync)
    WHERE gone_at IS NULL AND coalesce(user_priority, priority) = 'lo';
CREATE INDEX email_folders_hi ON email_folders (acntid)
    WHERE gone_at IS NULL AND coalesce(user_priority, priority) = 'hi';
CREATE STATISTICS email_folders_effective_priority ON (coalesce(user_priority, priority))
    FROM email_folders;
