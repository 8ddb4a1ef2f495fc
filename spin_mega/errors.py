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


def one_line_cause(exc: BaseException) -> str:
    """`Type: first line of the message` of the error underneath `exc`, for a sentence shown to the user.
    torch.distributed.checkpoint gathers each rank's error into `exc.failures` ({rank: error or (error,
    traceback)}) and prints their tracebacks in its own message; the first rank's error is the cause."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        first = failures[min(failures)]
        return one_line_cause(first[0] if isinstance(first, tuple) else first)
    # Wrappers ("Worker failure: ...") name their cause; the innermost error says what happened.
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def error_numbers(exc: BaseException) -> set[int]:
    """The errno of every OSError in `exc`, its causes and contexts, and torch.distributed.checkpoint's
    per-rank failures under it."""
    found, seen, todo = set(), set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            found.add(e.errno)
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo.extend(f[0] if isinstance(f, tuple) else f for f in failures.values())
        todo.extend([e.__cause__, e.__context__])
    return found
