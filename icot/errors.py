"""Errors that reach the user as one clear line."""


class UserError(Exception):
    """Bad input (a file, a line, a config key, a missing stage): `icot` prints it on one line and exits 2."""


class StagesStopped(UserError):
    """A signal stopped `icot pipeline` (or compare, demo) while stages ran: they checkpointed and exited.
    The exit status is the shell's for that signal (128 + its number)."""

    def __init__(self, signal_number: int):
        import signal

        self.exit_code = 128 + signal_number
        super().__init__(f"{signal.Signals(signal_number).name} received: the running stages checkpointed and "
                         f"exited; rerun the same command to resume them")
