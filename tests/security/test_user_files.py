"""A seeded fuzz of every file a user hands us: site YAMLs, experiment YAMLs, labels CSVs, images, weights
files and run stores, each mutated (bytes flipped, cut, spliced, lines replaced by hostile ones) and given
to the command that reads it, as the `fedretina` entry point runs it.

Every case ends in success, or in exactly one `fedretina: error:` line and a non-zero exit: never a
traceback (an uncaught exception fails the test), never a write in the dataset, and a read-only command
leaves its file's bytes alone. `FUZZ_CASES` sets the cases per file kind (CI: 12; `make test-security`:
60); the counts of cases tried and refused are printed with `-s`."""

from __future__ import annotations

import hashlib
import os
import random
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from server.directory import SiteInfo
from server.recorder import Recorder
from server.store import RunStore
from shared.config import load_config
from shared.data.checks import check_site
from shared.data.site_config import load_site_config
from shared.federation.aggregation import Verdict
from shared.training.initialisation import pretraining_start
from shared.weights import save_weights, weights_meta
from tests.conftest import write_site
from tests.security.cli import fedretina, one_error

pytestmark = pytest.mark.security
CASES = int(os.environ.get("FUZZ_CASES", "12"))
HOSTILE_LINES = [
    b"root: /",
    b"state_dir: .",
    b"name: ../../escaped",
    b"format: ../eyepacs",
    b"devices: -1",
    b"options: {labels: ../../../etc/passwd}",
    b"limits: {threads: 0}",
    b"profile: paper\x00",
    b"federation: {rounds_pretrain: 1e400}",
    b"seed: 99999999999999999999999999",
    b"sites: [*a]",
    b"name: &a [*a, *a]",
    b"\xff\xfe\x00bad",
    b"image,level",
    b"../../outside,0",
    b"/etc/passwd,3",
    b"7_left,NaN",
    b"7_left,99",
    b'"unterminated,2',
    b"9" * 5000,
]
TALLY: Counter[str] = Counter()


def mutations(data: bytes, seed: int, n: int) -> Iterator[bytes]:
    """`n` seeded variants of `data`: bytes flipped, the file cut or spliced, a line swapped for a hostile
    one, emptied."""
    rng = random.Random(seed)
    for i in range(n):
        kind = i % 5
        if kind == 0:
            out = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                if out:
                    out[rng.randrange(len(out))] = rng.randrange(256)
            yield bytes(out)
        elif kind == 1:
            yield data[: rng.randrange(len(data) + 1)]
        elif kind == 2:
            at = rng.randrange(len(data) + 1)
            yield data[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))) + data[at:]
        elif kind == 3:
            lines = data.split(b"\n")
            lines[rng.randrange(len(lines))] = rng.choice(HOSTILE_LINES)
            yield b"\n".join(lines)
        else:
            yield b"" if rng.random() < 0.5 else rng.choice(HOSTILE_LINES)


def tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def judged(kind: str, code: int, err: str, allowed: tuple[int, ...]) -> None:
    """Success, or one error line naming the problem; tallied for the suite's count."""
    TALLY[f"{kind} tried"] += 1
    assert "Traceback" not in err, err
    assert code in (0, *allowed), (code, err)
    if code:
        TALLY[f"{kind} refused"] += 1
        assert len(one_error(err)) > 10, err


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_site(tmp_path_factory.mktemp("fuzz-site"), "eyepacs", 6)


def fuzz(
    kind: str,
    target: Path,
    original: bytes,
    args: list[str],
    capsys: pytest.CaptureFixture[str],
    *,
    allowed: tuple[int, ...],
    dataset: Path,
    after: Callable[[], None] = lambda: None,
) -> None:
    before = tree(dataset) if not target.is_relative_to(dataset) else None
    try:
        for data in mutations(original, seed=zlib.crc32(kind.encode()), n=CASES):
            target.write_bytes(data)
            code, err = fedretina(args, capsys)
            judged(kind, code, err, allowed)
            if before is not None:
                assert tree(dataset) == before, f"{kind}: the dataset changed"
            after()
    finally:
        target.write_bytes(original)


def test_site_yamls(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = load_site_config(site).root
    fuzz(
        "site YAML",
        site,
        site.read_bytes(),
        ["site", "check", str(site)],
        capsys,
        allowed=(2, 3),
        dataset=dataset,
    )


def test_experiment_yamls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    experiment = tmp_path / "experiment.yaml"
    original = yaml.safe_dump(
        {"profile": "tiny", "name": "fuzz", "federation": {"rounds_pretrain": 2, "strategy": "fedprox"}}
    ).encode()
    fuzz(
        "experiment YAML",
        experiment,
        original,
        ["config", "-c", str(experiment)],
        capsys,
        allowed=(2,),
        dataset=tmp_path / "none",
    )


def test_labels_csvs(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = load_site_config(site)
    labels = config.root / "trainLabels.csv"
    manifest = config.state_root / "check" / "manifest.csv"

    def inside_root() -> None:
        if manifest.is_file():
            rows = manifest.read_text().splitlines()[1:]
            assert all(str(config.root) in row for row in rows), "a manifest row outside the dataset"

    fuzz(
        "labels CSV",
        labels,
        labels.read_bytes(),
        ["site", "check", str(site)],
        capsys,
        allowed=(3,),
        dataset=config.root,
        after=inside_root,
    )


def test_images(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = load_site_config(site)
    image = sorted((config.root / "train").glob("*.jpeg"))[0]
    fuzz(
        "image",
        image,
        image.read_bytes(),
        ["site", "check", str(site)],
        capsys,
        allowed=(3,),
        dataset=config.root,
    )


def test_weights_files(site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    check_site(load_site_config(site), workers=1)  # usable again after the other kinds' fuzzing
    cfg = load_config(profile="tiny")
    weights = tmp_path / "encoder.safetensors"
    model = pretraining_start(cfg)
    save_weights(weights, dict(model.encoder.state_dict()), weights_meta(cfg, "spark-encoder", epochs=1))
    args = ["analyze", "spectra", "--profile", "tiny", "--site", str(site), "--model", f"A={weights}"]
    args += ["--images", "2", "--name", "fuzz", "--set", f"runs_dir={tmp_path / 'runs'}"]
    fuzz(
        "weights file",
        weights,
        weights.read_bytes(),
        args,
        capsys,
        allowed=(2, 4),
        dataset=load_site_config(site).root,
    )


def test_run_stores(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`server summary` reads a store and never writes it: the mutated bytes stay as they were."""
    run = tmp_path / "fuzz-run"
    path = run / "federation" / "store.sqlite"
    store = RunStore(path, "fuzz-run")
    store.start_run("0123456789ab", 1, "iid-4", "fedavg", load_config(profile="tiny").model_dump(mode="json"))
    recorder = Recorder(store, "pretrain")
    recorder.round_started(1, 1)
    info = SiteInfo(node_id=5, name="a", partition=0, images=10, labelled={}, classes={})
    recorder.trained(
        1,
        info,
        metrics={"num-examples": 10, "train-loss": 0.5},
        nbytes=10,
        verdict=Verdict(None, 0.1),
        cosine=0.9,
        aggregated=True,
    )
    recorder.finished(1, 1, 1, {"train-loss": 0.5})
    store.finish_run("completed")
    for name in ("store.sqlite-wal", "store.sqlite-shm"):
        (path.parent / name).unlink(missing_ok=True)
    original = path.read_bytes()
    for data in mutations(original, seed=7, n=CASES):
        path.write_bytes(data)
        code, err = fedretina(["server", "summary", str(run)], capsys)
        judged("run store", code, err, allowed=(1,))
        assert path.read_bytes() == data, "server summary wrote to the store it read"
    path.write_bytes(original)


def test_the_suite_counts_what_it_tried_and_refused() -> None:
    """Printed with -s; each kind was tried, and the hostile corpus got some of each refused."""
    print("\nfuzz:", dict(sorted(TALLY.items())))
    for kind in ("site YAML", "experiment YAML", "labels CSV", "image", "weights file", "run store"):
        assert TALLY[f"{kind} tried"] == CASES, kind
        assert TALLY[f"{kind} refused"] > 0 or kind in ("labels CSV", "image"), kind
