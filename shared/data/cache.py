"""A per-site cache of preprocessed images (FOV crop at one size), so CPU epochs are not dominated by
decoding multi-megapixel JPEGs.

Layout: `<state_dir>/cache/<size>/{images.npy, fov.npy, index.json}`; the arrays are memory-mapped
(slot-major), the index maps image_id -> slot and remembers each source file's (size, mtime) so a changed file
is re-processed. Building is resumable (the index is saved after every chunk), parallel, and locked against a
second process building the same cache. The cache lives in the site's state directory and never travels.
"""

from __future__ import annotations

import fcntl
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd

from shared.data.fundus import preprocess
from shared.data.images import ImageProblem
from shared.errors import DataError
from shared.logs import progress_bar
from shared.rundir import atomic_write_text

log = logging.getLogger(__name__)
CHUNK = 64
T = TypeVar("T")
R = TypeVar("R")


class ImageCache:
    def __init__(self, directory: Path, size: int) -> None:
        self.dir = directory / str(size)
        self.size = size
        self._images: np.ndarray | None = None
        self._fov: np.ndarray | None = None
        self._index: dict[str, int] = {}

    def ensure(self, manifest: pd.DataFrame, workers: int = 2) -> None:
        """Preprocess every manifest image not cached yet (or changed since), then open the arrays."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with _locked(self.dir / ".lock"):
            state = self._read_index()
            todo = [
                r
                for r in manifest.itertuples(index=False)
                if state["files"].get(r.image_id) != _stamp(r.path)
            ]
            if todo:
                self._build(state, todo, workers)
        self._open()

    def get(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(rgb uint8 (S, S, 3), fov bool (S, S)) of a cached image."""
        if self._images is None or self._fov is None:
            raise RuntimeError("ImageCache.ensure() must run before get()")
        slot = self._index[image_id]
        return self._images[slot], self._fov[slot].astype(bool)

    def _build(self, state: dict, todo: list, workers: int) -> None:
        slots = state["slots"]
        needed = len(set(slots) | {r.image_id for r in todo})
        images, fov = self._arrays(needed)
        log.info("caching %d images at %d px into %s", len(todo), self.size, self.dir)
        bar = progress_bar(f"cache {self.size}px", total=len(todo), unit="img")
        with ProcessPoolExecutor(max_workers=max(1, workers)) if workers > 1 else _Serial() as pool:
            for start in range(0, len(todo), CHUNK):
                chunk = todo[start : start + CHUNK]
                results = pool.map(_preprocess, [(r.path, self.size) for r in chunk])
                for row, (rgb, mask, error) in zip(chunk, results, strict=True):
                    if error:
                        raise DataError(f"{row.path}: {error}; run `fedretina site check` to exclude it")
                    slot = slots.setdefault(row.image_id, len(slots))
                    images[slot], fov[slot] = rgb, mask
                    state["files"][row.image_id] = _stamp(row.path)
                images.flush()
                fov.flush()
                self._write_index(state)
                bar.update(len(chunk))
        bar.close()

    def _arrays(self, needed: int) -> tuple[np.ndarray, np.ndarray]:
        """Open the slot arrays with room for `needed` images, growing (copying) them when too small."""
        shape = (self.size, self.size)
        paths = self.dir / "images.npy", self.dir / "fov.npy"
        if paths[0].exists() and np.load(paths[0], mmap_mode="r").shape[0] >= needed:
            return np.load(paths[0], mmap_mode="r+"), np.load(paths[1], mmap_mode="r+")
        old = [np.load(p, mmap_mode="r") if p.exists() else None for p in paths]
        fresh = []
        for path, tail, prev in zip(paths, ((*shape, 3), shape), old, strict=True):
            tmp = path.with_suffix(".grow.npy")
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(needed, *tail))
            if prev is not None:
                arr[: prev.shape[0]] = prev
            arr.flush()
            tmp.replace(path)
            fresh.append(np.load(path, mmap_mode="r+"))
        return fresh[0], fresh[1]

    def _open(self) -> None:
        self._images = np.load(self.dir / "images.npy", mmap_mode="r")
        self._fov = np.load(self.dir / "fov.npy", mmap_mode="r")
        self._index = self._read_index()["slots"]

    def _read_index(self) -> dict:
        path = self.dir / "index.json"
        return json.loads(path.read_text()) if path.exists() else {"slots": {}, "files": {}}

    def _write_index(self, state: dict) -> None:
        atomic_write_text(self.dir / "index.json", json.dumps(state))


def _preprocess(args: tuple[str, int]) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    path, size = args
    try:
        out = preprocess(Path(path), size)
    except ImageProblem as exc:
        return None, None, exc.reason
    return out.rgb, out.fov.astype(np.uint8), ""


def _stamp(path: str) -> list[int]:
    st = Path(path).stat()
    return [st.st_size, st.st_mtime_ns]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class _Serial:
    """The executor interface, in this process (one worker, or inside a daemonic process)."""

    def __enter__(self) -> _Serial:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        return map(fn, items)
