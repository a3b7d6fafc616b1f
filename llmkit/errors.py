"""Error types that the CLI turns into one clear line and an exit code (no traceback)."""


class UserError(Exception):
    """Bad input from the user (config, data, files): printed as one message, exit code 2.

    The message names the file, line, field or key at fault and says what to do.
    """

    exit_code = 2
    same_on_every_process = False  # True: every process of a launch meets it alike, so only the main one prints it


class SettingsError(UserError):
    """Settings that do not fit together, found after composition (every process of a launch finds the same)."""

    same_on_every_process = True


class InterruptedRun(Exception):
    """The run stopped on a signal after saving a checkpoint; carries the exit code (130/143)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
