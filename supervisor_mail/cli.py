"""The ``supervisor-mail`` command line: parses arguments, runs one command, and turns every
error meant for a person into one line on stderr and a named exit code.

Nothing imports this module; it imports the rest.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable

from supervisor_mail import __version__, accounts, config, control, legacy, store
from supervisor_mail.errors import EXIT_OK, EXIT_USAGE, ConfigError, SupervisorMailError

PROG = "supervisor-mail"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.config = getattr(args, "config", None)  # -c given nowhere (see build_parser)
    if not getattr(args, "func", None):
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: a command is required", file=sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args) or EXIT_OK
    except SupervisorMailError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand without -c must not reset one given before it to None.
    common.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS,
                        help=f"configuration file (default: $SUPERVISOR_MAIL_CONFIG or "
                             f"{config.DEFAULT_PATH})")
    parser = argparse.ArgumentParser(
        prog=PROG, parents=[common],
        description="Background mail engine: IMAP sync into PostgreSQL, outbox delivery over "
                    "SMTP, and a watchdog that heals the engine when it hangs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    def command(parent, name: str, func: Callable, help: str) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, parents=[common], help=help, description=help)
        sub.set_defaults(func=func)
        return sub

    run = command(commands, "run", cmd_run,
                  "run the master in the foreground (supervisord, systemd)")
    run.add_argument("--log-stderr", action="store_true",
                     help="also write the log lines to stderr (the supervisord sample uses it)")
    command(commands, "start", cmd_start,
            "cron mode: start in the background unless a healthy master runs; exit 0 either way")
    command(commands, "stop", cmd_stop, "stop the running engine gracefully (its PID file)")
    command(commands, "reload", cmd_reload,
            "reload the configuration: SIGHUP to the master through its PID file")
    reset = command(commands, "reset", cmd_reset,
                    "the old manual restart: kill the engine's processes by their PID files, "
                    "delete the state DB and the PID files")
    reset.add_argument("--force", action="store_true", help="even when the master is healthy")
    command(commands, "healthcheck", cmd_healthcheck,
            "exit 0 healthy, 1 master hung, 2 not running, 3 degraded (being handled)")
    status = command(commands, "status", cmd_status,
                     "workers, slices, heartbeats, queue depth, outbox, per-account sync state "
                     "and recoveries, read-only")
    status.add_argument("--json", action="store_true",
                        help="print the same content as JSON (shape: supervisor_mail/status.py)")
    status.add_argument("--account", type=int, metavar="N",
                        help="only account N (acntid), with its folders")
    status.add_argument("--cluster", action="store_true",
                        help="the hosts sharing the database instead: heartbeats, leases per "
                             "host, accounts no host holds, recent lease moves")
    command(commands, "initdb", cmd_initdb, "create or upgrade the PostgreSQL schema")
    demo = command(commands, "demo", cmd_demo,
                   "the whole engine on embedded PostgreSQL, IMAP and SMTP servers with sample "
                   "mail: shows a sync and a delivery, then stops everything")
    demo.add_argument("--keep-running", action="store_true",
                      help="keep it all up for exploring with `status`, until Ctrl-C")
    sync = command(commands, "sync", cmd_sync,
                   "synchronize an account now, in the foreground (a progress bar on a terminal)")
    sync.add_argument("account", help="acntid or e-mail address")
    sync.add_argument("--folder", metavar="NAME",
                      help="only this folder (as the server or people spell it); default: all")
    sync.add_argument("--full", action="store_true",
                      help="also reconcile flags and deletions, not only fetch new messages")

    cfg_cmd = commands.add_parser("config", help="validate, show or migrate the configuration")
    cfg_sub = cfg_cmd.add_subparsers(title="config commands", metavar="COMMAND")
    command(cfg_sub, "check", cmd_config_check, "validate the configuration file")
    command(cfg_sub, "show", cmd_config_show, "print the effective settings (secrets masked)")
    command(cfg_sub, "sample", cmd_config_sample, "print a documented configuration file")
    inc = command(cfg_sub, "import-inc", cmd_config_import_inc,
                  "print the INI equivalent of the old engine's config.inc")
    inc.add_argument("path", metavar="PATH/config.inc")

    acc_cmd = commands.add_parser("account", help="manage mail accounts")
    acc_sub = acc_cmd.add_subparsers(title="account commands", metavar="COMMAND")
    add = command(acc_sub, "add", cmd_account_add, "add an account (prompts for what is missing)")
    add.add_argument("--email", help="the account's address")
    add.add_argument("--name", default="", help="a display name")
    add.add_argument("--owner", type=int, help="the web application's user id of the owner")
    for proto, security in (("imap", "tls"), ("smtp", "starttls")):
        add.add_argument(f"--{proto}-host", help=f"{proto.upper()} server host name")
        add.add_argument(f"--{proto}-port", type=int,
                         help=f"{proto.upper()} port (default from the security mode)")
        add.add_argument(f"--{proto}-security", choices=["tls", "starttls", "plain"],
                         default=security, help=f"default: {security}")
        add.add_argument(f"--{proto}-login", help="login name (default: the address)")
    add.add_argument("--password-file", metavar="FILE",
                     help="read the password from FILE (first line), for IMAP and SMTP; "
                          "without it the password is prompted for without echo")
    add.add_argument("--smtp-password-file", metavar="FILE",
                     help="a different SMTP password, read from FILE")
    command(acc_sub, "list", cmd_account_list, "list the accounts")
    test = command(acc_sub, "test", cmd_account_test,
                   "log in to the account's IMAP and SMTP servers, list its folders and report "
                   "capabilities and any TLS or login problem (changes nothing)")
    test.add_argument("account", help="acntid or e-mail address")
    rm = command(acc_sub, "remove", cmd_account_remove,
                 "remove an account with its folders, messages and outbox")
    rm.add_argument("account", help="acntid or e-mail address")
    for group in (cfg_cmd, acc_cmd):
        group.set_defaults(func=_usage_of(group))
    return parser


def _usage_of(parser: argparse.ArgumentParser) -> Callable:
    def usage(args: argparse.Namespace) -> int:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: a command is required", file=sys.stderr)
        return EXIT_USAGE
    return usage


def load_config(args: argparse.Namespace) -> config.Config:
    return config.load(args.config)


def cmd_run(args: argparse.Namespace) -> int:
    from supervisor_mail.master import Master

    cfg = config.load(args.config)
    cfg.require("database.dsn")
    master = Master(cfg, args.config, log_stderr=args.log_stderr)
    code = master.run()
    if master.halt_reason:
        print(f"{PROG}: {master.halt_reason}", file=sys.stderr)  # the log is not on screen
    return code


def cmd_start(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    cfg.require("database.dsn")
    print(control.start(cfg, args.config))
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    print(control.stop(load_config(args)))
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    print(control.reload(load_config(args)))
    return EXIT_OK


def cmd_reset(args: argparse.Namespace) -> int:
    print(control.reset(load_config(args), force=args.force))
    return EXIT_OK


def cmd_healthcheck(args: argparse.Namespace) -> int:
    state = control.health(load_config(args))
    print(state.reason)
    return state.code


def cmd_status(args: argparse.Namespace) -> int:
    import json
    import os

    from supervisor_mail import status

    if args.cluster:
        data = status.collect_cluster(load_config(args))
    else:
        data = status.collect(load_config(args), args.account)
    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        render = status.render_cluster if args.cluster else status.render
        sys.stdout.write(render(data, colour=colour))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from supervisor_mail import demo  # the embedded servers: the test extra

    return demo.run(args.keep_running)


def cmd_initdb(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    with store.connect(cfg, "initdb") as conn:
        applied = store.initdb(conn)
        version = max(store.applied_versions(conn), default=0)
    if applied:
        print(f"applied {len(applied)} migration(s): {', '.join(applied)}; "
              f"schema version {version}")
    else:
        print(f"schema is up to date (version {version}); nothing changed")
    return EXIT_OK


def cmd_sync(args: argparse.Namespace) -> int:
    from supervisor_mail import sync_command  # imports the IMAP stack only for this command

    return sync_command.run(load_config(args), args.account, args.folder, args.full)


def cmd_config_check(args: argparse.Namespace) -> int:
    cfg = config.load(args.config, must_exist=bool(args.config))
    missing = [s.name for s in config.SETTINGS if s.required and cfg[s.name] is None]
    for name in missing:
        cfg.require(name)
    print(f"{cfg.source or 'built-in defaults'}: configuration is valid")
    return EXIT_OK


def cmd_config_show(args: argparse.Namespace) -> int:
    sys.stdout.write(config.show(load_config(args)))
    return EXIT_OK


def cmd_config_sample(args: argparse.Namespace) -> int:
    sys.stdout.write(config.sample())
    return EXIT_OK


def cmd_config_import_inc(args: argparse.Namespace) -> int:
    sys.stdout.write(legacy.import_inc(args.path))
    return EXIT_OK


def _read_secret(path: str | None, prompt: str) -> str:
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                return f.readline().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the password file: {exc.strerror}") from None
    if not sys.stdin.isatty():
        raise ConfigError(f"{prompt.rstrip(': ')} needed: pass --password-file FILE "
                          "(passwords are never taken from the command line)")
    return getpass.getpass(prompt)


def _ask(value: str | None, prompt: str) -> str:
    if value:
        return value
    if not sys.stdin.isatty():
        raise ConfigError(f"{prompt} is required: pass it as an option")
    return input(f"{prompt}: ").strip()


def cmd_account_add(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    email = _ask(args.email, "--email")
    values: dict[str, object] = {"email": email, "name": args.name, "owner_id": args.owner}
    password = None
    for proto in ("imap", "smtp"):
        host = getattr(args, f"{proto}_host")
        if not host:
            continue
        if password is None:
            password = _read_secret(args.password_file, "password: ")
        values.update({
            f"{proto}_host": host, f"{proto}_port": getattr(args, f"{proto}_port"),
            f"{proto}_security": getattr(args, f"{proto}_security"),
            f"{proto}_login": getattr(args, f"{proto}_login") or email,
            f"{proto}_password": password})
    if args.smtp_password_file and args.smtp_host:
        values["smtp_password"] = _read_secret(args.smtp_password_file, "SMTP password: ")
    if "imap_host" not in values and "smtp_host" not in values:
        raise ConfigError("an account needs --imap-host, --smtp-host or both")
    with store.connect(cfg, "account") as conn:
        acntid = accounts.add(conn, **values)
    print(f"added account {acntid} <{email}>")
    return EXIT_OK


def cmd_account_list(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    with store.connect(cfg, "account") as conn:
        rows = accounts.list_all(conn)
    print(f"{'acntid':>6}  {'enabled':7}  {'email':32}  {'imap':28}  smtp")
    for a in rows:
        imap = f"{a.imap_host}:{a.imap_port} {a.imap_security}" if a.has_imap else "-"
        smtp = f"{a.smtp_host}:{a.smtp_port} {a.smtp_security}" if a.has_smtp else "-"
        print(f"{a.acntid:>6}  {'yes' if a.enabled else 'no':7}  {a.email:32}  {imap:28}  {smtp}")
    return EXIT_OK


def cmd_account_test(args: argparse.Namespace) -> int:
    from supervisor_mail import account_test
    from supervisor_mail.errors import EXIT_SERVER

    cfg = load_config(args)
    with store.connect(cfg, "account") as conn:
        account = accounts.get(conn, args.account)
    ok, report = account_test.run(cfg, account)
    print(report)
    return EXIT_OK if ok else EXIT_SERVER


def cmd_account_remove(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    with store.connect(cfg, "account") as conn:
        account = accounts.get(conn, args.account)
        accounts.remove(conn, account.acntid)
    print(f"removed account {account.acntid} <{account.email}>")
    return EXIT_OK
