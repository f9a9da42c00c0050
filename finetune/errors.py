"""The one base class of user errors: reported as one `error:` line and exit code 2, never a traceback."""


class FinetuneError(ValueError):
    """Something the user can fix (config, data, model, checkpoint, environment), stated in one line."""
