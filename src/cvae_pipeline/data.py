"""MNIST as the pipeline uses it: fetch the IDX files, verify them, binarize, and store them compactly.

The dataset manifest (a committed JSON file, a dependency of the prepare stage) lists the HTTPS mirrors
and, for each of the four files, its name, image count and the published MD5 of its uncompressed bytes.
Raw files are kept uncompressed in a DVC-tracked folder; a file already there with the right MD5 is not
fetched again. The prepared output is one `.npz` (no pickle) holding bit-packed 0/1 images and labels of three splits:
the training images, the validation images (`data.validation_size` of the 60,000 training images, chosen at random by
`data.validation_seed`, never trained on) and the test images; each with its images' positions in their IDX file.
"""

import gzip
import hashlib
import json
import logging
import os
import ssl
import struct
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cvae_pipeline.config import DataParams
from cvae_pipeline.errors import DataError, ParamsError
from cvae_pipeline.fileio import DAMAGED_FILE_ERRORS, atomic_path, write_bytes_atomic
from cvae_pipeline.scores import SPLITS, TEST, TRAIN, VALIDATION

log = logging.getLogger(__name__)

MIRROR_ENV = "MNIST_MIRROR"
SIDE = 28
PIXELS = SIDE * SIDE
IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
IDX_SPLITS = (TRAIN, TEST)  # the splits of the IDX files
DOWNLOAD_TIMEOUT_S = 30


@dataclass(frozen=True)
class FileSpec:
    name: str
    md5: str
    count: int

    @property
    def is_images(self) -> bool:
        return "images" in self.name


@dataclass(frozen=True)
class Manifest:
    mirrors: tuple[str, ...]
    files: dict[str, FileSpec]  # keys: train_images, train_labels, test_images, test_labels


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # (n, 28, 28) uint8 in {0, 1}
    labels: np.ndarray  # (n,) uint8 in 0..9
    indices: np.ndarray | None = None  # (n,) each image's position in its IDX file


@dataclass(frozen=True)
class PreparedData:
    train: Split
    test: Split
    validation: Split | None = None  # None: no validation set (data.validation_size 0, the tutorial)
    source: Path | None = None  # the file it was read from, which MLflow records as the runs' dataset

    @property
    def selection(self) -> tuple[str, Split]:
        """The split that every per-epoch score and every choice reads, and its name: the validation set, or the test
        set where there is none (the tutorial's way)."""
        return (VALIDATION, self.validation) if self.validation is not None else (TEST, self.test)


def load_manifest(path: str | Path) -> Manifest:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        files = {key: FileSpec(**raw["files"][key]) for key in _file_keys()}
        mirrors = tuple(raw["mirrors"])
    except FileNotFoundError:
        raise DataError(f"{path}: dataset manifest not found") from None
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(f"{path}: malformed dataset manifest ({error!r}); expected mirrors and files "
                        f"{', '.join(_file_keys())} with name, md5, count") from None
    insecure = [m for m in mirrors if not m.startswith("https://")]
    if insecure:
        raise DataError(f"{path}: mirror {insecure[0]} is not an https:// URL; only HTTPS downloads are allowed")
    return Manifest(mirrors, files)


def _file_keys() -> list[str]:
    return [f"{split}_{kind}" for split in IDX_SPLITS for kind in ("images", "labels")]


def parse_idx(raw: bytes, spec: FileSpec) -> np.ndarray:
    """Check an uncompressed IDX file's header against `spec` and return its array (images or labels)."""
    magic, dims = (IMAGES_MAGIC, 3) if spec.is_images else (LABELS_MAGIC, 1)
    header = 4 + 4 * dims
    if len(raw) < header:
        raise DataError(f"{spec.name}: truncated, {len(raw)} bytes is shorter than the {header}-byte IDX header")
    found_magic, *shape = struct.unpack(f">{1 + dims}I", raw[:header])
    if found_magic != magic:
        raise DataError(f"{spec.name}: wrong IDX magic number 0x{found_magic:08x}, expected 0x{magic:08x}")
    if shape[0] != spec.count:
        raise DataError(f"{spec.name}: header says {shape[0]} items, expected {spec.count}")
    if spec.is_images and shape[1:] != [SIDE, SIDE]:
        raise DataError(f"{spec.name}: images are {shape[1]}x{shape[2]}, expected {SIDE}x{SIDE}")
    expected_size = header + int(np.prod(shape))
    if len(raw) != expected_size:
        raise DataError(f"{spec.name}: {len(raw)} bytes, expected {expected_size} (truncated or padded)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def verify(raw: bytes, spec: FileSpec) -> np.ndarray:
    """Header check, then the published MD5 of the uncompressed bytes; returns the parsed array."""
    array = parse_idx(raw, spec)
    digest = hashlib.md5(raw).hexdigest()
    if digest != spec.md5:
        raise DataError(f"{spec.name}: MD5 {digest} does not match the published {spec.md5}")
    return array


def _gunzip(blob: bytes, source: str) -> bytes:
    try:
        return gzip.decompress(blob)
    except (EOFError, OSError, zlib.error) as error:
        raise DataError(f"{source}: truncated or corrupt gzip ({error})") from None


def _download(url: str) -> bytes:
    # A context of its own: from Python 3.12 urlopen's default one is made once per process, and would not see an
    # SSL_CERT_FILE (a mirror's own certificate authority) set after the first download.
    context = ssl.create_default_context() if url.startswith("https:") else None
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S, context=context) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        chunks = []
        with tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1], leave=False) as bar:
            while chunk := response.read(1 << 16):
                chunks.append(chunk)
                bar.update(len(chunk))
    data = b"".join(chunks)
    if total is not None and len(data) != total:
        raise DataError(f"{url}: download truncated at {len(data)} of {total} bytes")
    return data


def _from_folder(folder: Path, spec: FileSpec) -> bytes:
    for candidate in (folder / f"{spec.name}.gz", folder / spec.name):
        if candidate.is_file():
            blob = candidate.read_bytes()
            return _gunzip(blob, str(candidate)) if candidate.suffix == ".gz" else blob
    raise DataError(f"{folder}: neither {spec.name}.gz nor {spec.name} is there (missing file)")


def _from_url(base: str, spec: FileSpec) -> bytes:
    """`<base>/<name>.gz`, or `<base>/<name>` when the mirror serves it uncompressed."""
    for suffix in (".gz", ""):
        url = base.rstrip("/") + "/" + spec.name + suffix
        try:
            blob = _download(url)
        except urllib.error.HTTPError as error:
            if error.code == 404 and suffix:
                continue
            raise DataError(f"{url}: could not be downloaded (HTTP {error.code} {error.reason})") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            raise DataError(f"{url}: could not be downloaded ({getattr(error, 'reason', error)})") from None
        return _gunzip(blob, url) if suffix else blob
    raise AssertionError("unreachable: the uncompressed name is always tried")


def sources_from_environment(manifest: Manifest) -> list[str]:
    """`MNIST_MIRROR` (a folder or an https:// URL) when set, else the manifest's public mirrors."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if not mirror:
        return list(manifest.mirrors)
    if "://" in mirror and not mirror.startswith("https://"):
        raise DataError(f"{MIRROR_ENV}={mirror}: must be a folder or an https:// URL")
    if "://" not in mirror and not Path(mirror).is_dir():
        raise DataError(f"{MIRROR_ENV}={mirror}: no such folder (set it to a folder or an https:// URL)")
    return [mirror]


def _kept(spec: FileSpec, raw_dir: Path) -> np.ndarray | None:
    """The verified array of a raw file fetched earlier, or None when it is absent or damaged."""
    kept = raw_dir / spec.name
    if not kept.is_file():
        return None
    try:
        return verify(kept.read_bytes(), spec)
    except DataError as error:
        log.warning("%s; fetching it again", error)
        return None


def fetch_file(spec: FileSpec, sources: list[str], raw_dir: Path) -> np.ndarray:
    """Fetch `spec` from the first source that gives a valid file, keep it in `raw_dir`, return its array."""
    failures = []
    for source in sources:
        try:
            raw = _from_url(source, spec) if source.startswith("https://") else _from_folder(Path(source), spec)
            array = verify(raw, spec)
        except DataError as error:
            failures.append(str(error))
            continue
        write_bytes_atomic(raw_dir / spec.name, raw)
        log.info("%s: fetched and verified from %s", spec.name, source)
        return array
    if len(failures) == 1:
        raise DataError(failures[0])
    raise DataError(f"{spec.name}: no mirror gave a valid file: " + "; ".join(failures))


def fetch_all(manifest: Manifest, raw_dir: Path) -> dict[str, np.ndarray]:
    """All four verified arrays; only files missing or damaged in `raw_dir` are fetched (and only then is
    `MNIST_MIRROR` consulted)."""
    arrays = {key: _kept(spec, raw_dir) for key, spec in manifest.files.items()}
    missing = [key for key, array in arrays.items() if array is None]
    if missing:
        sources = sources_from_environment(manifest)
        for key in missing:
            arrays[key] = fetch_file(manifest.files[key], sources, raw_dir)
    return arrays


def binarize(images: np.ndarray, threshold: float) -> np.ndarray:
    """As the tutorial: pixel / 255 >= threshold becomes 1, else 0 (at 0.5: 127 -> 0, 128 -> 1)."""
    return (images.astype(np.float32) / np.float32(255.0) >= np.float32(threshold)).astype(np.uint8)


def split_validation(count: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The positions of the training and of the validation images among `count` training images: `size` of them,
    drawn at random by `seed`, for validation; each list in the IDX file's order."""
    if size >= count:
        raise ParamsError(f"params.yaml: data.validation_size must be less than the {count} training images, "
                          f"got {size}")
    chosen = np.zeros(count, dtype=bool)
    chosen[np.random.default_rng(seed).choice(count, size, replace=False)] = True
    return np.flatnonzero(~chosen), np.flatnonzero(chosen)


def prepare(manifest: Manifest, raw_dir: Path, cfg: DataParams) -> PreparedData:
    """Fetch and verify all four files, hold the validation set out of the training images, keep the first
    `train_limit` training and `test_limit` test images, and binarize them."""
    arrays = fetch_all(manifest, raw_dir)
    train, validation = split_validation(len(arrays["train_images"]), cfg.validation_size, cfg.validation_seed)
    positions = {TRAIN: train[:cfg.train_limit], VALIDATION: validation,
                 TEST: np.arange(len(arrays["test_images"]))[:cfg.test_limit]}
    splits = {}
    for split, chosen in positions.items():
        source = TEST if split == TEST else TRAIN
        splits[split] = Split(binarize(arrays[f"{source}_images"][chosen], cfg.threshold),
                              arrays[f"{source}_labels"][chosen], chosen)
    if not len(validation):
        splits[VALIDATION] = None
        log.info("data.validation_size is 0: no validation set; every per-epoch score and every choice of an epoch "
                 "or a run reads the test set, as the tutorial does, so its test numbers are no longer unbiased")
    return PreparedData(**splits)


def save_prepared(data: PreparedData, path: str | Path) -> None:
    """One `.npz` with bit-packed images (98 bytes an image), labels and positions, written atomically."""
    arrays = {}
    for split in SPLITS:
        part: Split | None = getattr(data, split)
        if part is None:
            continue
        arrays[f"{split}_images"] = np.packbits(part.images.reshape(len(part.images), PIXELS), axis=1)
        arrays[f"{split}_labels"] = part.labels
        if part.indices is not None:
            arrays[f"{split}_indices"] = part.indices
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        np.savez(handle, **arrays)


def load_prepared(path: str | Path) -> PreparedData:
    """Read what `save_prepared` wrote; never unpickles."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            splits = {}
            for split in SPLITS:
                if split == VALIDATION and f"{split}_images" not in archive:
                    continue  # prepared without a validation set
                packed = archive[f"{split}_images"]
                images = np.unpackbits(packed, axis=1, count=PIXELS).reshape(-1, SIDE, SIDE)
                indices = archive.get(f"{split}_indices")
                splits[split] = Split(images, archive[f"{split}_labels"], indices)
    except FileNotFoundError:
        raise DataError(f"{path}: prepared data not found; run `dvc repro prepare` first") from None
    except DAMAGED_FILE_ERRORS as error:
        raise DataError(f"{path}: damaged prepared data ({type(error).__name__}: {error}); "
                        "run `dvc repro -f prepare` to prepare it again") from None
    return PreparedData(**splits, source=Path(path))


def summarize(data: PreparedData, cfg: DataParams) -> dict:
    summary: dict = {"threshold": cfg.threshold, "validation_seed": cfg.validation_seed}
    for split in SPLITS:
        part: Split | None = getattr(data, split)
        if part is None:
            continue
        summary[split] = {
            "images": len(part.images),
            "fraction_on": round(float(part.images.mean()), 6) if len(part.images) else 0.0,
        }
    return summary
