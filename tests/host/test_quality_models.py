"""The quality lab's written encoder (devkit/quality_models.py) against patch means computed plainly."""

import numpy as np
import pytest
import torch

from devkit.synthetic_models import import_comfy


@pytest.fixture(scope="module")
def taesd():
    import_comfy()
    import comfy.taesd.taesd

    return comfy.taesd.taesd


def _patch_means(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N, 4, H/8, W/8): R, G, B and max(0, luminance - 0.5), each averaged per 8x8 patch."""
    luminance = (images * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    features = torch.cat([images, (luminance - 0.5).clamp_min(0)], 1)
    return torch.nn.functional.avg_pool2d(features, 8)


def test_the_written_encoder_gives_standardised_patch_means(taesd):
    from devkit.quality_models import written_encoder

    generator = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 64, 48, generator=generator)
    mean, std = torch.tensor([0.1, 0.2, 0.3, 0.05]), torch.tensor([0.5, 0.25, 2.0, 0.1])
    encoder = taesd.Encoder(latent_channels=4)
    written_encoder(encoder, mean, std)
    with torch.no_grad():
        latent = encoder(images)
    expected = (_patch_means(images) - mean.view(1, 4, 1, 1)) / std.view(1, 4, 1, 1)
    assert latent.shape == (3, 4, 8, 6)
    torch.testing.assert_close(latent, expected, rtol=1e-5, atol=1e-5)


def test_a_crop_on_the_8px_grid_encodes_to_the_latent_crop(taesd):
    """The decoder trains on 32 px crops: their latents must be exactly the full latent's crops (no padding reaches)."""
    from devkit.quality_models import written_encoder

    images = torch.from_numpy(np.random.default_rng(1).random((2, 3, 64, 64), dtype=np.float32))
    encoder = taesd.Encoder(latent_channels=4)
    written_encoder(encoder)
    with torch.no_grad():
        full, crop = encoder(images), encoder(images[:, :, 16:48, 8:40])
    torch.testing.assert_close(crop, full[:, :, 2:6, 1:5], rtol=1e-5, atol=1e-6)
