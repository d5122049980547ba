"""The documentation figure: a real fundus photograph beside synthetic ones by grade, camera and neuro."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from skimage import data

from shared.data.synth.camera import CAMERA_STYLES
from shared.data.synth.render import FundusSpec, render_fundus

_DR_NAMES = ("none", "mild", "moderate", "severe NPDR", "proliferative")
_MM_NAMES = ("normal", "tessellated", "diffuse atrophy", "patchy atrophy", "macular atrophy")
_NOTE = (
    "Top left: a real photograph (skimage.data.retina).\n"
    "Rows: one eye at ICDR DR grades 0-4; one myopic eye\n"
    "at META-PM 0-4 (mmac camera); one eye through each\n"
    "camera style; one patient without and with the neuro\n"
    "vascular sign (wider venules, narrower arterioles, more\n"
    "tortuous, sparser), meant to be invisible in one image."
)


def montage(path: Path, height: int = 256) -> None:
    """Write the figure as a PNG at `path`; each synthetic tile is rendered `height` pixels tall."""
    topcon = CAMERA_STYLES["topcon"]
    fig = Figure(figsize=(7 * height / 100, 4 * height / 100 * 1.12), dpi=100)
    grid = fig.add_gridspec(4, 7, wspace=0.04, hspace=0.18, left=0.01, right=0.99, top=0.96, bottom=0.01)

    def tile(row: int, col: int, image: np.ndarray, label: str) -> None:
        ax = fig.add_subplot(grid[row, col])
        ax.imshow(image)
        ax.set_title(label, fontsize=max(7, height // 24))
        ax.axis("off")

    real = fig.add_subplot(grid[0:2, 0:2])
    real.imshow(data.retina())
    real.set_title("real photograph (skimage.data.retina)", fontsize=max(8, height // 18))
    real.axis("off")
    for grade in range(5):
        dr = render_fundus(FundusSpec(3, 11, "left", dr_grade=grade), topcon, height).image
        tile(0, 2 + grade, dr, f"DR {grade}: {_DR_NAMES[grade]}")
        mm = render_fundus(FundusSpec(8, 4, "left", mm_grade=grade), CAMERA_STYLES["mmac"], height).image
        tile(1, 2 + grade, mm, f"MM {grade}: {_MM_NAMES[grade]}")
    for col, (name, style) in enumerate(CAMERA_STYLES.items()):
        tile(2, col, render_fundus(FundusSpec(5, 21, "right", dr_grade=2), style, height).image, name)
    pair = [render_fundus(FundusSpec(12, 30, "left", neuro=n), topcon, height).image for n in (False, True)]
    tile(3, 0, pair[0], "neuro=False")
    tile(3, 1, pair[1], "neuro=True")
    diff = np.abs(pair[0].astype(np.int16) - pair[1].astype(np.int16)).max(axis=2, keepdims=True)
    tile(3, 2, np.repeat(np.clip(4 * diff, 0, 255).astype(np.uint8), 3, axis=2), "|difference| x4")
    note = fig.add_subplot(grid[3, 3:7])
    note.text(0.02, 0.98, _NOTE, va="top", ha="left", fontsize=max(7, height // 22), family="monospace")
    note.axis("off")
    fig.savefig(path, pil_kwargs={"quality": 88} if path.suffix.lower() in (".jpg", ".jpeg") else None)
