"""User-facing errors: the CLI prints the message as one sentence and exits non-zero, without a traceback."""


class SpinMegaError(Exception):
    """Bad input or an unusable environment; the message is shown to the user as is."""

    exit_code = 2


class ConfigError(SpinMegaError):
    """A configuration value is unknown, mistyped or inconsistent; the message names the dotted key."""


class DataError(SpinMegaError):
    """The data cannot be used: missing file, malformed rows beyond tolerance, or nothing left to train on."""


class TrainingUnhealthy(SpinMegaError):
    """Training stopped before an update on non-finite values or a collapse; the last good checkpoint is kept."""

    exit_code = 3
