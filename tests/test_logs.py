"""The package's messages reach nnU-Net's training log during training and stderr otherwise."""
import logging

from nnunet_dino.backbones import build_backbone
from nnunet_dino.nnunet.logs import route_to_trainer, stop_routing


class FakeTrainer:
    def __init__(self):
        self.lines = []

    def print_to_log_file(self, *args, **kwargs):
        self.lines.append(" ".join(str(a) for a in args))


def test_messages_go_to_the_training_log_then_back_to_stderr(capsys, monkeypatch):
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # as under nnUNetv2_train: nobody configured logging
    trainer = FakeTrainer()
    handler = route_to_trainer(trainer)
    try:
        build_backbone("dinov3_vits16", "random", depth=1, taps=(0,))
    finally:
        stop_routing(handler)
    assert any("dinov3_vits16 uses RANDOM weights" in line for line in trainer.lines)
    assert "RANDOM" not in capsys.readouterr().err  # not twice
    logging.getLogger("nnunet_dino.backbones.weights").info("hashing a big file once")
    assert "hashing a big file once" in capsys.readouterr().err
    assert not any("hashing" in line for line in trainer.lines)


def test_a_second_trainer_replaces_the_first_route():
    first, second = FakeTrainer(), FakeTrainer()
    route_to_trainer(first)
    handler = route_to_trainer(second)
    try:
        logging.getLogger("nnunet_dino.backbones").warning("note")
    finally:
        stop_routing(handler)
    assert first.lines == [] and second.lines == ["nnunet-dino: note"]
