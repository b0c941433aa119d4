"""Checkpoints: nnU-Net 2.8.1's schema, stock-layout and 0.1.0 checkpoints still load, safe reading, atomic writing."""
import copy
import json
import os
from pathlib import Path

import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_dino.errors import DinoUNetError
from nnunet_dino.nnunet.checkpoints import CHECKPOINT_KEYS, WEIGHTS_ONLY_MARKER, read_checkpoint, write_checkpoint
from nnunet_dino.nnunet.demo_trainers import nnUNetTrainerDinoUNet_smoke
from nnunet_dino.testing.synthetic import STOCK_ARCH, stock_plans

FIXTURES = Path(__file__).parent / "fixtures"
DATASET_JSON = {"channel_names": {"0": "grey"}, "labels": {"background": 0, "a": 1, "b": 2}, "numTraining": 2,
                "file_ending": ".png"}


def make_trainer(tmp_path, monkeypatch, cls, plans, dataset_json=DATASET_JSON):
    """A trainer as nnUNetv2_train builds it, on CPU, with throw-away nnU-Net folders."""
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "res"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    data = tmp_path / "pre" / plans["dataset_name"] / plans["configurations"]["2d"]["data_identifier"]
    data.mkdir(parents=True, exist_ok=True)
    (data / "case.b2nd").touch()  # nnU-Net infers its dataset class from the file ending
    plans = dict(copy.deepcopy(plans), continue_training=False)
    trainer = cls(plans, "2d", 0, dataset_json, device=torch.device("cpu"))
    trainer.initialize()
    return trainer


def sgd_steps(trainer, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    trainer.network.train()
    for _ in range(n):
        x = torch.randn(2, 1, 64, 64, generator=g)
        y = torch.randint(0, 3, (2, 1, 64, 64), generator=g)
        loss = trainer.loss(trainer.network(x), y)
        trainer.optimizer.zero_grad()
        loss.backward()
        trainer.optimizer.step()


def test_schema_is_nnunet_2_8_1s(tmp_path, monkeypatch):
    """Stock nnU-Net's own save_checkpoint writes exactly the keys we build: a schema change breaks here."""
    plans = stock_plans()
    plans["configurations"]["2d"]["patch_size"] = [64, 64]
    stock = make_trainer(tmp_path / "stock", monkeypatch, nnUNetTrainer, plans)
    stock.save_checkpoint(str(tmp_path / "stock.pth"))
    written = torch.load(tmp_path / "stock.pth", map_location="cpu", weights_only=False)
    assert tuple(written) == CHECKPOINT_KEYS


def test_loads_a_checkpoint_written_by_stock_nnunet_save(tmp_path, monkeypatch):
    """The stock save path (full optimizer state, nnU-Net's own dict) on our network, loaded by our trainer."""
    trainer = make_trainer(tmp_path, monkeypatch, nnUNetTrainerDinoUNet_smoke, stock_plans())
    sgd_steps(trainer)
    trainer.current_epoch = 4
    nnUNetTrainer.save_checkpoint(trainer, str(tmp_path / "stock_layout.pth"))
    fresh = make_trainer(tmp_path / "b", monkeypatch, nnUNetTrainerDinoUNet_smoke, stock_plans())
    fresh.load_checkpoint(str(tmp_path / "stock_layout.pth"))
    assert fresh.current_epoch == 5
    for a, b in zip(trainer.network.state_dict().values(), fresh.network.state_dict().values(), strict=True):
        assert a == b if not isinstance(a, torch.Tensor) else torch.equal(a, b)
    momentum = [s["momentum_buffer"] for s in fresh.optimizer.state_dict()["state"].values()]
    assert momentum and all(m.abs().sum() > 0 for m in momentum[:5])


def test_our_checkpoints_round_trip_and_keep_momentum_only_in_latest(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, monkeypatch, nnUNetTrainerDinoUNet_smoke, stock_plans())
    sgd_steps(trainer)
    for name in ("checkpoint_latest.pth", "checkpoint_best.pth"):
        trainer.save_checkpoint(str(tmp_path / name))
    latest, best = (read_checkpoint(tmp_path / n) for n in ("checkpoint_latest.pth", "checkpoint_best.pth"))
    assert tuple(latest) == tuple(best) == CHECKPOINT_KEYS
    assert latest["optimizer_state"]["state"] and best["optimizer_state"] == {WEIGHTS_ONLY_MARKER: True}
    assert not any(k.startswith("backbone.") for k in latest["network_weights"])
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("which", ["latest", "final"])
def test_checkpoints_written_by_0_1_0_still_load(tmp_path, monkeypatch, which):
    plans = json.loads((FIXTURES / "v0.1.0_plans.json").read_text())
    dataset_json = json.loads((FIXTURES / "v0.1.0_dataset.json").read_text())
    trainer = make_trainer(tmp_path, monkeypatch, nnUNetTrainerDinoUNet_smoke, plans, dataset_json)
    trainer.load_checkpoint(str(FIXTURES / f"v0.1.0_checkpoint_{which}.pth"))
    assert trainer.current_epoch == 3
    io = torch.load(FIXTURES / "v0.1.0_io.pth", weights_only=True)
    trainer.network.eval()
    with torch.no_grad():
        assert torch.allclose(trainer.network(io["input"]), io["logits"], atol=1e-5, rtol=1e-5)
    has_momentum = bool(trainer.optimizer.state_dict()["state"])
    assert has_momentum == (which == "latest")


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"network_weights": {}, "init_args": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(DinoUNetError, match="Refusing to load .*evil.pth: it holds objects other than weights"):
        read_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DinoUNetError, match="not a readable checkpoint"):
        read_checkpoint(tmp_path / "junk.pth")
    with pytest.raises(DinoUNetError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pth")


def test_failed_save_leaves_previous_checkpoint_and_no_debris(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint_best.pth"
    write_checkpoint({"a": torch.ones(2)}, target)
    real_save = torch.save

    def disk_full(obj, f, *a, **k):
        Path(f).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 4; basic_ios::clear: "
                           "iostream error")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(DinoUNetError, match="No space left on device while saving .*checkpoint_best.pth"):
        write_checkpoint({"a": torch.zeros(2)}, target)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(torch.load(target)["a"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_best.pth"]


def test_stock_arch_fixture_is_stock():
    assert STOCK_ARCH["network_class_name"].endswith("PlainConvUNet")


def test_resume_from_latest_restores_the_exact_training_state(tmp_path, monkeypatch):
    """checkpoint_latest is written every epoch (save_every 1) and restores weights, momentum, epoch, lr, log."""
    trainer = make_trainer(tmp_path, monkeypatch, nnUNetTrainerDinoUNet_smoke, stock_plans())
    assert trainer.save_every == 1
    for epoch in range(3):
        trainer.current_epoch = epoch
        trainer.lr_scheduler.step(epoch)
        sgd_steps(trainer, n=1, seed=epoch)
        trainer.logger.log("train_losses", 1.0 / (epoch + 1), epoch)
        trainer.logger.log("lrs", trainer.optimizer.param_groups[0]["lr"], epoch)
    trainer.save_checkpoint(str(tmp_path / "checkpoint_latest.pth"))
    fresh = make_trainer(tmp_path / "b", monkeypatch, nnUNetTrainerDinoUNet_smoke, stock_plans())
    fresh.load_checkpoint(str(tmp_path / "checkpoint_latest.pth"))
    fresh.lr_scheduler.step(fresh.current_epoch)  # what on_train_epoch_start does for the next epoch
    trainer.lr_scheduler.step(trainer.current_epoch + 1)
    assert fresh.current_epoch == trainer.current_epoch + 1 == 3
    assert fresh.optimizer.param_groups[0]["lr"] == trainer.optimizer.param_groups[0]["lr"]
    a, b = trainer.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k]["momentum_buffer"], b[k]["momentum_buffer"]) for k in a)
    sa, sb = trainer.network.state_dict(), fresh.network.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor))
    assert fresh.logger.get_checkpoint() == trainer.logger.get_checkpoint()
