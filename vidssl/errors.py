"""Exception types shared by every vidssl component.

The CLI maps them to exit codes: :class:`UserError` (and its subclass
:class:`vidssl.config.ConfigError`) exit with 2 and print one line; anything else is a runtime
failure and exits with 1.
"""


class UserError(Exception):
    """A problem with what the user asked for: bad argument, missing input, bad config value.

    The message must say which input, which value and what is allowed; it is printed as one line.
    """


class RuntimeFailure(Exception):
    """A failure while doing the work (a decode that broke, a disk that filled up).

    Raised with a message fit for one line; the CLI exits with 1.
    """
