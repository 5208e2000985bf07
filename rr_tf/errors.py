"""Error types whose message is one line naming the offending file or flag."""


class RrTfError(Exception):
    """Base class of every error rr_tf raises on purpose."""


class DataError(RrTfError):
    """A file (or folder) that cannot be used, with the reason.

    ``str(err)`` is ``"<path>: <reason>"`` on one line, ready to print.
    """

    def __init__(self, path, reason):
        self.path = str(path)
        self.reason = " ".join(str(reason).split())  # force one line
        super().__init__(f"{self.path}: {self.reason}")


class SpecMismatchError(DataError):
    """Existing output was made with a different preprocessing spec."""


class ConfigError(RrTfError):
    """An invalid option value; the message names the option."""

    def __init__(self, name, reason):
        self.name = name
        self.reason = " ".join(str(reason).split())
        super().__init__(f"{name}: {self.reason}")
