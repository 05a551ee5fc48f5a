"""User-facing errors: raised for bad input, printed by the CLI and server as one line."""


class UserError(Exception):
    """Something the user can fix; the message names what is wrong and what to change."""
