"""The one base class of the errors a user can cause and fix.

A wrong flag, a missing or damaged file, a run folder in the wrong state, a
machine without the requested device: each raises a subclass of `AllcnnError`
with a one-line message. The command line prints that line and exits non-zero;
anything else is a bug and keeps its traceback. Each subclass also derives from
the built-in error it used to be (ValueError, RuntimeError), so code that
caught those still does.
"""


class AllcnnError(Exception):
    """Something the user can fix; the message is one line that says what."""


class FileAccessError(AllcnnError, OSError):
    """The system refused to read or write a file (permissions, a full disk, a missing folder)."""

    @classmethod
    def of(cls, error: OSError, path=None) -> "FileAccessError":
        """One line naming the file and the system's reason."""
        return cls(f"{path or error.filename}: {error.strerror or error}")
