"""Natural photographs for supervised pretraining offline: the honest stand-in for ImageNet.

The second seed (Srinivasan et al. 2022) starts half its models from ImageNet weights. None exist offline
here, so where the user gives no local ImageNet file, "external data" is the colour and grey photographs
that ship inside scikit-image (a portrait, a cat, coffee, a rocket, a galaxy field, tissue, a motorcycle, a
cameraman, the moon, coins, brick, grass, gravel, a clock): one class per photograph, trained on random
crops (MoCo v2's recipe: 20-100% of the area, flips, colour jitter), normalised with ImageNet's statistics as
real ImageNet pretraining is. Fourteen classes of crops are far less than ImageNet's 1.28 M images: results
from it are labelled "natural photos (stand-in)" wherever they appear, never "ImageNet". scikit-image's own
fundus photographs (retina, microaneurysms) are left out: they are in the target domain.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage import data as skdata
from skimage.transform import resize
from torch.utils.data import Dataset

from shared.data import transforms as T
from shared.seeding import derive_seed, generator

PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "stereo_motorcycle",
    "camera",
    "moon",
    "coins",
    "brick",
    "grass",
    "gravel",
    "clock",
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SOURCE = "natural photos (scikit-image; stand-in for ImageNet)"  # how tables name it


def photo(name: str, side: int) -> torch.Tensor:
    """scikit-image's photograph `name` as a (3, side, side) float image in [0, 1]: its central square."""
    image = getattr(skdata, name)()
    if isinstance(image, tuple):  # stereo pairs: the left view
        image = image[0]
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    square = image[top : top + s, left : left + s, :3].astype(np.float64) / 255.0
    return torch.from_numpy(resize(square, (side, side), anti_aliasing=True)).permute(2, 0, 1).float()


class NaturalCrops(Dataset):
    """`crops` random crops per epoch, crop i of the photograph `i % len(PHOTOS)` (its class), at `size` px.

    Crops are drawn from (epoch seed, i), as `FundusDataset` draws augmentations, so an epoch is reproducible
    whatever the loader's workers.
    """

    def __init__(self, size: int, crops: int) -> None:
        self.size, self.crops = size, crops
        self.source = 2 * size  # crops of 20-100% of the area, resized down to `size`
        self.photos = [photo(name, self.source) for name in PHOTOS]
        self.epoch_seed = 0

    def set_epoch_seed(self, seed: int) -> None:
        self.epoch_seed = seed

    def __len__(self) -> int:
        return self.crops

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        label = i % len(self.photos)
        params = T.draw("contrastive", self.source, self.size, generator(derive_seed(self.epoch_seed, i)))
        square = torch.ones(1, self.source, self.source, dtype=torch.bool)
        image, inside = T.apply(self.photos[label], square, params, self.size)
        return {
            "image": T.normalise(image, IMAGENET_MEAN, IMAGENET_STD),
            "fov": inside,  # all of a photograph is image: masked modelling scores every patch
            "label": torch.tensor(label),
            "index": torch.tensor(i),
        }
