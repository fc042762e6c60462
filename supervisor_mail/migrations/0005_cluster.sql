-- Several hosts on one database (issue 8): hosts, account leases with a fencing
-- generation, and what moved and who committed what, for status --cluster and the tests.
-- supervisor_mail/cluster.py owns every statement on these tables.

-- One row a host_id. A host is live while its heartbeat is younger than its own
-- lease_ttl; `instance` names one run of one master (machine, boot, pid, start time),
-- so a planner respawned by the same master is the same host, and a second engine
-- started with the same host_id is told apart and refused.
CREATE TABLE email_cluster_hosts (
    host_id       text PRIMARY KEY,
    instance      text NOT NULL,
    hostname      text NOT NULL,
    pid           integer NOT NULL,             -- the master's
    version       text NOT NULL,
    lease_ttl     integer NOT NULL CHECK (lease_ttl > 0),
    started_at    timestamptz NOT NULL,
    heartbeat_at  timestamptz NOT NULL
);
COMMENT ON TABLE email_cluster_hosts IS
    'supervisor_mail: engine hosts sharing this database, with their heartbeats';

-- One row an account, created with it (trigger below): who may synchronize it. A lease
-- is held while expires_at is in the future (the database's clock, never a host's);
-- each claim raises the generation, and a sync batch commits only under the holder's
-- current generation. A lease being given up (`releasing`) is no longer renewed or
-- planned for, and lapses at expires_at, so workers that trusted it until then stop
-- before anyone else may take it.
CREATE TABLE email_account_leases (
    acntid       bigint PRIMARY KEY REFERENCES email_accounts ON DELETE CASCADE,
    host_id      text,
    generation   bigint NOT NULL DEFAULT 0,
    acquired_at  timestamptz,
    expires_at   timestamptz NOT NULL DEFAULT '-infinity',
    releasing    boolean NOT NULL DEFAULT false
);
CREATE INDEX email_account_leases_host ON email_account_leases (host_id, expires_at);
COMMENT ON TABLE email_account_leases IS
    'supervisor_mail: which host synchronizes each account, until when, under which generation';

INSERT INTO email_account_leases (acntid) SELECT acntid FROM email_accounts;

CREATE FUNCTION email_accounts_lease() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO email_account_leases (acntid) VALUES (NEW.acntid);
    RETURN NULL;
END $$;
CREATE TRIGGER email_accounts_lease AFTER INSERT ON email_accounts
    FOR EACH ROW EXECUTE FUNCTION email_accounts_lease();

-- Every claim: from whom (NULL: never held), to whom, why. Pruned after a week.
CREATE TABLE email_lease_moves (
    id          bigserial PRIMARY KEY,
    acntid      bigint NOT NULL,
    from_host   text,
    to_host     text NOT NULL,
    generation  bigint NOT NULL,
    reason      text NOT NULL CHECK (reason IN ('new', 'released', 'expired')),
    moved_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX email_lease_moves_at ON email_lease_moves (moved_at);
COMMENT ON TABLE email_lease_moves IS 'supervisor_mail: account leases taken, most recent last';

-- One row a committed sync batch, written in the batch's own transaction: which host,
-- under which generation, stored which UIDs when. Pruned after a day.
CREATE TABLE email_sync_batches (
    id            bigserial PRIMARY KEY,
    acntid        bigint NOT NULL,
    emfdid        bigint NOT NULL REFERENCES email_folders ON DELETE CASCADE,
    host_id       text NOT NULL,
    generation    bigint NOT NULL,
    last_uid      bigint NOT NULL,
    messages      integer NOT NULL,
    committed_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX email_sync_batches_at ON email_sync_batches (committed_at);
CREATE INDEX email_sync_batches_folder ON email_sync_batches (emfdid);
COMMENT ON TABLE email_sync_batches IS
    'supervisor_mail: committed sync batches with the host and lease generation behind each';
