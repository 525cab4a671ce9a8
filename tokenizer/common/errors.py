"""Expected errors: bad input the user can fix (a setting, a file, an out_dir in use), each message naming its
culprit. The scripts' hydra entry (scripts/_hydra.py) prints these as one message and exits non-zero without a
traceback; every other exception is a bug and keeps its traceback.

Each kind also derives from the builtin a caller would catch for it (ValueError, FileNotFoundError, ...)."""


class UserError(Exception):
    """Bad input the user can fix; the message names the file or setting at fault."""


class ConfigError(UserError, ValueError):
    """A setting is of the wrong type, not finite, out of range or empty."""


class BadFileError(UserError, ValueError):
    """A file exists but is unreadable, truncated, damaged, or not what it should be."""


class DamagedFileError(BadFileError):
    """A file that cannot be read as what it claims to be: truncated, corrupted, failing its checksums."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the command names does not exist."""


class OutDirBusyError(UserError, RuntimeError):
    """Another run holds the out_dir."""


class OutputExistsError(UserError, FileExistsError):
    """The out_dir already holds output this command would not continue."""


class LayoutError(UserError, RuntimeError):
    """A weights file's keys or shapes do not fit the model it is loaded into."""
