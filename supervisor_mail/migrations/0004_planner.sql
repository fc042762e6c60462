-- What the planner needs beyond the initial schema.

-- When the account's folder list was last read from the server (LIST). NULL: never,
-- so the planner queues a discovery task first; after that it is repeated every
-- sync.hi_full_interval so folders created on the server appear.
ALTER TABLE email_accounts ADD COLUMN folders_listed_at timestamptz;
COMMENT ON COLUMN email_accounts.folders_listed_at IS
    'supervisor_mail: when the folder list was last read from the IMAP server';
