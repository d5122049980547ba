"""The natural-photo stand-in for ImageNet: scikit-image's own photographs, none of them a fundus; crops
reproducible from the epoch seed, one class per photograph, normalised with ImageNet's statistics."""

from __future__ import annotations

import torch

from shared.data.photos import IMAGENET_MEAN, IMAGENET_STD, PHOTOS, NaturalCrops, photo


def test_photographs_load_offline_as_squares_and_exclude_the_fundus_images() -> None:
    assert not {"retina", "microaneurysms"} & set(PHOTOS)
    for name in PHOTOS:
        image = photo(name, 48)
        assert image.shape == (3, 48, 48) and 0.0 <= float(image.min()) <= float(image.max()) <= 1.0


def test_crops_are_seeded_by_epoch_and_labelled_by_their_photograph() -> None:
    data = NaturalCrops(32, crops=2 * len(PHOTOS))
    data.set_epoch_seed(5)
    first = [data[i] for i in range(len(data))]
    assert [int(item["label"]) for item in first] == list(range(len(PHOTOS))) * 2
    assert torch.equal(data[3]["image"], first[3]["image"])  # the same draw for the same (seed, index)
    assert not torch.equal(first[3]["image"], first[3 + len(PHOTOS)]["image"])  # another crop, same photo
    data.set_epoch_seed(6)
    assert not torch.equal(data[3]["image"], first[3]["image"])
    # un-normalised, every crop lies in [0, 1]: the normalisation is ImageNet's
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    raw = first[0]["image"] * std + mean
    assert raw.shape == (3, 32, 32) and float(raw.min()) >= -1e-5 and float(raw.max()) <= 1 + 1e-5
