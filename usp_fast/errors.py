"""Errors caused by the user's input (config, data, checkpoints, exports, transfers). The command line prints
them as one line from rank 0 and exits non-zero (`--debug` shows the traceback); anything else is a bug and
keeps its traceback. Each also derives from the built-in error it replaces, so callers may catch either."""


class UserError(Exception):
    """Bad input: a config key, a file, a data root, a checkpoint or an export."""


class ConfigError(UserError, ValueError):
    pass


class DataError(UserError, ValueError):
    pass


class CheckpointError(UserError, FileNotFoundError):
    pass


class TrainingDiverged(UserError, RuntimeError):
    """A non-finite loss or gradient norm stopped the run (nothing non-finite was saved)."""
