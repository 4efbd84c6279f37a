"""Errors that reach the user as one clear line."""


class UserError(Exception):
    """Bad input (a file, a line, a config key, a missing stage): `icot` prints it on one line and exits 2."""
