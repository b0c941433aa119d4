"""The one exception type users see.

Every failure a user can cause (missing weight file, wrong backbone, bad input size, ...) is raised as
``DinoUNetError`` with a single-line message that names the fix. Internal invariants use plain asserts.
"""


class DinoUNetError(RuntimeError):
    """A user-fixable problem; the message is one line and says what to do."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def install_excepthook() -> None:
    """Make an uncaught DinoUNetError print its one line (the stock console scripts would show a traceback)."""
    import sys

    previous = sys.excepthook
    if getattr(previous, "_nnunet_dino", False):
        return

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, DinoUNetError):
            print(f"nnunet-dino: error: {exc}", file=sys.stderr)  # noqa: T201 (the one line instead of a traceback)
        else:
            previous(exc_type, exc, tb)

    hook._nnunet_dino = True
    sys.excepthook = hook
