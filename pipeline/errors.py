"""The one exception type for problems the user can fix."""


class UserError(Exception):
    """Bad input or state the user can fix; its message is one line saying what and how.

    The CLI prints it as ``error: <message>`` and exits with status 2, without a traceback.
    """
