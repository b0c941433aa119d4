import logging
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    """Fast tier first: a unit failure reports within minutes, the end-to-end runs (marked e2e) come last."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is not None)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No test sees the user's weights folder or hash cache."""
    monkeypatch.delenv("nnUNet_dino_weights", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    logging.getLogger("nnunet_dino").setLevel(logging.INFO)


@pytest.fixture(scope="session")
def trained_smoke(tmp_path_factory):
    """One trained smoke model (synthetic 1-channel dataset, folds 0 and 1, --npz) shared by the e2e tests that
    only need "a trained model"; they must not retrain or delete it."""
    from e2e_support import train_smoke_model

    return train_smoke_model(tmp_path_factory.mktemp("smoke_model"))
