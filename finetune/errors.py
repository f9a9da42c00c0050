"""The one base class of user errors: reported as one `error:` line and exit code 2, never a traceback."""


class FinetuneError(ValueError):
    """Something the user can fix (config, data, model, checkpoint, environment), stated in one line."""


# How a surviving rank's one line starts when another rank died (finetune.distributed.rank_lost); the
# launcher (finetune.launch_output) recognises it and names the dead rank instead, which only it knows.
RANK_LOST = "lost the connection to another rank"
