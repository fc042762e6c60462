"""supervisor_mail: the background mail engine of the document-management application."""

__version__ = "0.1.0"
