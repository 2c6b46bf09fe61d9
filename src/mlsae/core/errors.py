"""One exception type for user-facing errors: the CLI prints its message as one line and exits 2."""


class MlsaeError(Exception):
    """A problem with the user's input or files (bad model, missing column, corrupt shard...)."""


class Interrupted(Exception):
    """Work stopped by a signal after saving what it could; the CLI exits 128 + signum."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
