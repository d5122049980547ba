"""Decode an image file into 8-bit RGB, converting what can be converted and refusing the rest clearly.

Fundus cameras and exports produce JPEG, PNG and TIFF in many modes: greyscale (red-free photography),
16-bit, RGBA, CMYK, palette. Each conversion is reported as a note; a file that cannot be a photograph
(empty, truncated, 1-bit, float) raises `ImageProblem` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Pillow's own defaults protect us (set nothing globally): truncated files raise, and images beyond
# 2 x Image.MAX_IMAGE_PIXELS (~179 MP, far above a 20 MP fundus photograph) raise DecompressionBombError.


class ImageProblem(Exception):
    """The file cannot be used as a fundus photograph; `kind` is one of the report's problem kinds."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class Decoded:
    rgb: np.ndarray  # uint8 (H, W, 3); smaller than the file when decoded in JPEG draft mode
    size: tuple[int, int]  # (width, height) of the file itself
    mode: str  # the file's own PIL mode, e.g. "RGB", "I;16", "CMYK"
    bits: int  # bits per channel in the file
    channels: int  # channels in the file
    note: str  # what conversion was applied, "" if none


BITS = {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I": 32, "F": 32}
CHANNELS = {"1": 1, "L": 1, "P": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4, "YCbCr": 3, "I;16": 1}


def decode(path: Path, draft: int | None = None) -> Decoded:
    """Read `path` as uint8 RGB; `draft` lets a JPEG decode at reduced scale when `draft` px suffice."""
    if path.stat().st_size == 0:
        raise ImageProblem("zero-byte", "the file is empty (0 bytes)")
    try:
        with Image.open(path) as img:
            size = img.size
            if draft and img.format == "JPEG":
                img.draft("RGB", (draft, draft))
            img.load()
            return _to_rgb(img, size)
    except UnidentifiedImageError:
        raise ImageProblem("undecodable", "not a readable image (unknown or corrupt format)") from None
    except OSError as exc:
        text = str(exc).lower()
        if "truncated" in text or "unexpected end" in text or "broken data stream" in text:
            raise ImageProblem("truncated", f"the file is truncated ({exc})") from None
        raise ImageProblem("undecodable", f"cannot decode: {exc}") from None
    except (SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageProblem("undecodable", f"cannot decode: {exc}") from None


def _to_rgb(img: Image.Image, size: tuple[int, int]) -> Decoded:
    mode = img.mode
    bits = BITS.get(mode, 8)
    channels = CHANNELS.get(mode, len(img.getbands()))
    if mode == "RGB":
        return Decoded(np.asarray(img, dtype=np.uint8), size, mode, bits, channels, "")
    if mode in ("1", "F"):
        kind = "1-bit black-and-white" if mode == "1" else "32-bit floating-point"
        reason = f"{kind} image ({mode}) is not a photograph; export it as 8-bit RGB"
        raise ImageProblem("unsupported-mode", reason)
    if mode.startswith("I"):
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if arr.max() > 255 or mode.startswith("I;16") else 255.0
        grey = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        note = f"{bits}-bit greyscale scaled to 8-bit and replicated to RGB (no colour information)"
        return Decoded(np.repeat(grey[..., None], 3, axis=2), size, mode, bits, channels, note)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        rgb = Image.alpha_composite(black, rgba).convert("RGB")
        note = f"{mode} with alpha composited on black and converted to RGB"
        return Decoded(np.asarray(rgb, dtype=np.uint8), size, mode, bits, channels, note)
    notes = {"L": "greyscale replicated to RGB (no colour information)", "CMYK": "CMYK converted to RGB"}
    note = notes.get(mode, f"{mode} converted to RGB")
    return Decoded(np.asarray(img.convert("RGB"), dtype=np.uint8), size, mode, bits, channels, note)
