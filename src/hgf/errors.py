"""User-facing errors: the CLI prints them as one line and exits with status 2."""


class HGFError(Exception):
    """A problem with the user's input (config, data, checkpoint, file); message is one line."""
