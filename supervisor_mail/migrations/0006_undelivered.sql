-- A message the server could not deliver (a NO for it alone, or the connection dropped
-- on it twice) is stored as a row without bytes; this marks it so that every full sync
-- of its folder asks for it again, until the server sends it or expunges it. Adding a
-- column with a constant default rewrites nothing, however large the table.
ALTER TABLE email_messages ADD COLUMN undelivered boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN email_messages.undelivered IS
    'supervisor_mail: the server could not deliver it; each full sync asks for it again';
