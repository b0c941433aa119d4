"""`nnunet-dino features`: PCA and cosine-similarity views of the frozen encoder's tokens."""
import numpy as np
import pytest
from PIL import Image

from nnunet_dino.backbones import build_backbone
from nnunet_dino.commands.cli import main
from nnunet_dino.commands.features import feature_views, read_image
from nnunet_dino.errors import DinoUNetError


def test_views_have_the_token_grid_and_the_point_is_itself(tmp_path):
    image = np.zeros((70, 90), np.float32)
    image[10:60, 20:80] = np.linspace(0.2, 1, 60)[None]
    views = feature_views(image, build_backbone("dinov3_test_tiny"), point=(30, 40))
    assert views.pca_rgb.shape == (5, 6, 3) and views.similarity.shape == (5, 6)
    assert views.similarity[30 // 16, 40 // 16] == pytest.approx(1.0, abs=1e-5)
    assert np.all(views.pca_rgb[0, 0] == 0)  # background token (dark corner) is black
    assert views.pca_rgb.max() > 0.5


def test_features_command_png_and_nifti(tmp_path, capsys):
    import nibabel as nib

    png = tmp_path / "slice.png"
    Image.fromarray((np.random.default_rng(0).random((64, 48)) * 255).astype(np.uint8)).save(png)
    assert main(["features", str(png), "--backbone", "dinov3_test_tiny", "--weights", "random",
                 "--layer", "1", "--point", "10", "20", "-o", str(tmp_path / "f.png")]) == 0
    assert (tmp_path / "f.png").stat().st_size > 10_000
    vol = np.random.default_rng(1).random((40, 50, 9)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "v.nii.gz"))
    assert read_image(tmp_path / "v.nii.gz", 3).shape == (50, 40)
    assert main(["features", str(tmp_path / "v.nii.gz"), "--backbone", "dinov3_test_tiny", "--weights", "random",
                 "--slice", "20", "-o", str(tmp_path / "g.png")]) == 2
    assert "--slice 20 is outside" in capsys.readouterr().err
    with pytest.raises(DinoUNetError, match="not tapped"):
        feature_views(np.ones((32, 32), np.float32), build_backbone("dinov3_test_tiny"), layer=7)
