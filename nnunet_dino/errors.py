"""The one exception type users see.

Every failure a user can cause (missing weight file, wrong backbone, bad input size, ...) is raised as
``DinoUNetError`` with a single-line message that names the fix. Internal invariants use plain asserts.
"""


class DinoUNetError(RuntimeError):
    """A user-fixable problem; the message is one line and says what to do."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
