"""One exception type for user-facing errors: the CLI prints its message as one line and exits 2."""


class MlsaeError(Exception):
    """A problem with the user's input or files (bad model, missing column, corrupt shard...)."""
