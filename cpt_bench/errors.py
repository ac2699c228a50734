"""User errors: one-line messages, exit code 2 (placeholder until the errors module lands)."""


class UserError(Exception):
    """A bad input from the user."""
