"""Process titles, so ``ps`` shows who does what: ``supervisor_mail: sync 3 [53,824] INBOX``.

A title never contains a password: callers pass roles, ids and folder names only.
"""

import setproctitle

PREFIX = "supervisor_mail: "


def set_title(text: str) -> None:
    setproctitle.setproctitle(PREFIX + text)

