"""Where the package's own messages go: nnU-Net's training log while a trainer runs, stderr otherwise.

nnU-Net never configures Python ``logging``, so without this the hashing note (a minute for the 7B file), the
read-only-mapping fallback and the random-weights warning would be invisible under ``nnUNetv2_train``.
"""
from __future__ import annotations

import logging
import sys
from typing import Any

PACKAGE = "nnunet_dino"


class TrainingLogHandler(logging.Handler):
    """Forwards records to ``trainer.print_to_log_file`` (the training log file and the console, rank 0)."""

    def __init__(self, trainer: Any):
        super().__init__(logging.INFO)
        self.trainer = trainer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.trainer.print_to_log_file(f"nnunet-dino: {record.getMessage()}")
        except Exception:  # noqa: BLE001 - logging must never break training
            self.handleError(record)


class _StderrHandler(logging.StreamHandler):
    """stderr, unless a trainer is routing the messages or the application configured logging itself."""

    def __init__(self):
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        logger = logging.getLogger(PACKAGE)
        if any(isinstance(h, TrainingLogHandler) for h in logger.handlers) or logging.getLogger().handlers:
            return
        self.stream = sys.stderr  # follow redirections (pytest's capsys, contextlib.redirect_stderr)
        super().emit(record)


def install_default_handler() -> None:
    """Once per process: INFO and above of the package go to stderr (idempotent)."""
    logger = logging.getLogger(PACKAGE)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


def route_to_trainer(trainer: Any) -> TrainingLogHandler:
    """Send the package's messages to this trainer's log (replacing an earlier trainer's route)."""
    logger = logging.getLogger(PACKAGE)
    for h in [h for h in logger.handlers if isinstance(h, TrainingLogHandler)]:
        logger.removeHandler(h)
    handler = TrainingLogHandler(trainer)
    logger.addHandler(handler)
    return handler


def stop_routing(handler: logging.Handler) -> None:
    logging.getLogger(PACKAGE).removeHandler(handler)
