"""``python -m supervisor_mail`` runs the same command line as ``supervisor-mail``."""
import sys

from supervisor_mail.cli import main

sys.exit(main())
