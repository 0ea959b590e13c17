"""Errors caused by the user's input: the command line prints them as one line and exits with 2."""


class UserError(Exception):
    """Bad flag, missing data, wrong checkpoint...: a message meant for the person at the terminal."""
