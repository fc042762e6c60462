"""Exception types, one per kind of failure, each with the exit code ``cli`` turns it into.

Every error here is meant for a person: its message is one line that names the
thing that is wrong and, where there is one, the fix.
"""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_DATABASE = 4
EXIT_SERVER = 5
EXIT_STATE = 6


class SupervisorMailError(Exception):
    """Base class; ``exit_code`` is what the command line exits with."""

    exit_code = EXIT_FAILURE


class ConfigError(SupervisorMailError):
    """Raised when a configuration file, key or value is invalid."""

    exit_code = EXIT_CONFIG


class DatabaseError(SupervisorMailError):
    """Raised when PostgreSQL cannot be reached or refuses what the engine needs."""

    exit_code = EXIT_DATABASE


class SchemaError(DatabaseError):
    """Raised when ``initdb`` meets a table it did not create, or a migration fails."""


class NotFoundError(SupervisorMailError):
    """Raised when a named account, folder or message does not exist."""

    exit_code = EXIT_FAILURE


class ServerError(SupervisorMailError):
    """Raised when an IMAP or SMTP server cannot be reached or refuses the session."""

    exit_code = EXIT_SERVER


class AuthError(ServerError):
    """Raised when an IMAP or SMTP server rejects the account's credentials."""


class TLSRequiredError(ServerError):
    """Raised when STARTTLS is configured but the server does not offer it."""


class StateError(SupervisorMailError):
    """Raised when the state DB or the PID files cannot be used (full tmpfs, permissions)."""

    exit_code = EXIT_STATE


class TransientServerError(ServerError):
    """Raised when a server refuses for a reason that passes (RFC 5530 [UNAVAILABLE], [LIMIT],
    [INUSE], too many connections): retried after a short backoff, never taken for a bad password.
    """


class ProtocolError(ServerError):
    """Raised when a server's response cannot be understood: fails the task, not the process."""


class NetworkError(TransientServerError):
    """Raised when a server cannot be reached, or the connection breaks or times out."""


class LeaseLost(SupervisorMailError):
    """Raised when this host no longer holds the account lease a sync task runs under (it
    expired, or another host took it with a newer generation): the task's work stops, its
    batch in hand is not stored, and its IMAP session is closed."""

    exit_code = EXIT_DATABASE


class HostConflictError(ConfigError):
    """Raised when another live engine on the same database already uses this host_id."""
