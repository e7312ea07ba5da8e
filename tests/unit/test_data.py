"""MNIST handling: IDX parsing, verification, fetching from folders and HTTPS mirrors, binarization, storage."""

import gzip
import hashlib
import http.server
import ssl
import subprocess
import threading

import numpy as np
import pytest

from cvae_pipeline import data
from cvae_pipeline.data import FileSpec, binarize, fetch_all, load_manifest, parse_idx, verify
from cvae_pipeline.errors import DataError, ParamsError
from helpers import IDX_NAMES, idx_bytes, params_with


def spec_for(key, array):
    return FileSpec(IDX_NAMES[key], hashlib.md5(idx_bytes(array)).hexdigest(), len(array))


# --- IDX parsing and verification -------------------------------------------------------------------------

def test_idx_images_and_labels_round_trip(fake_mnist):
    _, _, arrays = fake_mnist
    for key in ("train_images", "test_labels"):
        parsed = verify(idx_bytes(arrays[key]), spec_for(key, arrays[key]))
        np.testing.assert_array_equal(parsed, arrays[key])


@pytest.mark.parametrize(("corrupt", "message"), [
    (lambda raw: b"\x00\x00\x08\x01" + raw[4:], "wrong IDX magic number 0x00000801, expected 0x00000803"),
    (lambda raw: raw[:4] + (299).to_bytes(4, "big") + raw[8:], "header says 299 items, expected 300"),
    (lambda raw: raw[:8] + (27).to_bytes(4, "big") + raw[12:], "images are 27x28, expected 28x28"),
    (lambda raw: raw[:10], "truncated, 10 bytes is shorter than the 16-byte IDX header"),
    (lambda raw: raw[:-5], "expected 235216 (truncated or padded)"),
    (lambda raw: raw + b"\x00", "expected 235216 (truncated or padded)"),
])
@pytest.mark.reliability
def test_bad_idx_headers_are_named(fake_mnist, corrupt, message):
    _, _, arrays = fake_mnist
    spec = spec_for("train_images", arrays["train_images"])
    with pytest.raises(DataError, match="train-images-idx3-ubyte: ") as caught:
        parse_idx(corrupt(idx_bytes(arrays["train_images"])), spec)
    assert message in str(caught.value)


@pytest.mark.reliability
def test_md5_mismatch_is_named(fake_mnist):
    _, _, arrays = fake_mnist
    raw = bytearray(idx_bytes(arrays["test_labels"]))
    raw[-1] = (raw[-1] + 1) % 10  # a valid header and size, one label changed
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: MD5 [0-9a-f]{32} does not match the published"):
        verify(bytes(raw), spec_for("test_labels", arrays["test_labels"]))


def test_shipped_manifest_has_the_published_sums():
    manifest = load_manifest("data/mnist.json")
    assert manifest.files["train_images"].md5 == "6bbc9ace898e44ae57da46a324031adb"
    assert manifest.files["test_labels"].count == 10000
    assert all(m.startswith("https://") for m in manifest.mirrors)


@pytest.mark.reliability
def test_manifest_with_http_mirror_is_refused(tmp_path, fake_mnist):
    _, manifest_path, _ = fake_mnist
    text = manifest_path.read_text().replace("https://127.0.0.1:9/", "http://example.org/")
    (tmp_path / "insecure.json").write_text(text)
    with pytest.raises(DataError, match="is not an https:// URL"):
        load_manifest(tmp_path / "insecure.json")


# --- binarization ---------------------------------------------------------------------------------------------

def test_binarization_boundary_is_the_tutorials():
    pixels = np.array([0, 1, 126, 127, 128, 129, 254, 255], dtype=np.uint8)
    np.testing.assert_array_equal(binarize(pixels, 0.5), [0, 0, 0, 0, 1, 1, 1, 1])
    assert binarize(pixels, 0.5).dtype == np.uint8


def test_binarization_follows_the_threshold():
    pixels = np.arange(256, dtype=np.uint8)
    assert binarize(pixels, 0.25).sum() == 256 - 64  # 64/255 >= 0.25, 63/255 < 0.25


# --- fetching from a folder -------------------------------------------------------------------------------------

def test_fetch_from_folder_keeps_verified_raw_files(fake_mnist, tmp_path, monkeypatch):
    mirror, manifest_path, arrays = fake_mnist
    monkeypatch.setenv("MNIST_MIRROR", str(mirror))
    raw_dir = tmp_path / "raw"
    fetched = fetch_all(load_manifest(manifest_path), raw_dir)
    for key, array in arrays.items():
        np.testing.assert_array_equal(fetched[key], array)
        assert (raw_dir / IDX_NAMES[key]).read_bytes() == idx_bytes(array)
    # A second fetch reads the kept files: it works with the mirror gone.
    monkeypatch.setenv("MNIST_MIRROR", str(tmp_path / "gone"))
    again = fetch_all(load_manifest(manifest_path), raw_dir)
    np.testing.assert_array_equal(again["test_images"], arrays["test_images"])


def test_fetch_reads_uncompressed_files_and_replaces_a_damaged_kept_file(fake_mnist, tmp_path, monkeypatch):
    _, manifest_path, arrays = fake_mnist
    plain = tmp_path / "plain"
    plain.mkdir()
    for key, array in arrays.items():
        (plain / IDX_NAMES[key]).write_bytes(idx_bytes(array))
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    (raw_dir / IDX_NAMES["train_images"]).write_bytes(b"damaged")
    monkeypatch.setenv("MNIST_MIRROR", str(plain))
    fetched = fetch_all(load_manifest(manifest_path), raw_dir)
    np.testing.assert_array_equal(fetched["train_images"], arrays["train_images"])
    assert (raw_dir / IDX_NAMES["train_images"]).read_bytes() == idx_bytes(arrays["train_images"])


@pytest.mark.reliability
def test_missing_file_in_mirror_is_named(fake_mnist, tmp_path, monkeypatch):
    mirror, manifest_path, _ = fake_mnist
    (mirror / "t10k-labels-idx1-ubyte.gz").unlink()
    monkeypatch.setenv("MNIST_MIRROR", str(mirror))
    with pytest.raises(DataError, match=r"neither t10k-labels-idx1-ubyte\.gz nor t10k-labels-idx1-ubyte is there"):
        fetch_all(load_manifest(manifest_path), tmp_path / "raw")


@pytest.mark.reliability
def test_truncated_gzip_is_named(fake_mnist, tmp_path, monkeypatch):
    mirror, manifest_path, _ = fake_mnist
    archive = mirror / "train-images-idx3-ubyte.gz"
    archive.write_bytes(archive.read_bytes()[:1000])
    monkeypatch.setenv("MNIST_MIRROR", str(mirror))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: truncated or corrupt gzip"):
        fetch_all(load_manifest(manifest_path), tmp_path / "raw")
    assert not (tmp_path / "raw" / "train-images-idx3-ubyte").exists()


@pytest.mark.parametrize(("value", "message"), [
    ("http://example.org/mnist", "must be a folder or an https:// URL"),
    ("ftp://example.org/mnist", "must be a folder or an https:// URL"),
    ("/no/such/folder", "no such folder"),
])
@pytest.mark.reliability
def test_bad_mirror_setting_is_refused(fake_mnist, tmp_path, monkeypatch, value, message):
    _, manifest_path, _ = fake_mnist
    monkeypatch.setenv("MNIST_MIRROR", value)
    with pytest.raises(DataError, match=f"MNIST_MIRROR={value}: {message}"):
        fetch_all(load_manifest(manifest_path), tmp_path / "raw")


# --- fetching over HTTPS ----------------------------------------------------------------------------------------

@pytest.fixture
def https_mirror(fake_mnist, tmp_path, monkeypatch):
    """A real HTTPS server on loopback serving the fake mirror, trusted through SSL_CERT_FILE."""
    mirror, _, _ = fake_mnist
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(mirror))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    yield f"https://127.0.0.1:{server.server_address[1]}/", mirror
    server.shutdown()


def test_download_over_https_falls_back_to_the_next_mirror(https_mirror, fake_mnist, tmp_path, monkeypatch):
    url, _ = https_mirror
    _, manifest_path, arrays = fake_mnist
    monkeypatch.delenv("MNIST_MIRROR", raising=False)
    manifest = load_manifest(manifest_path)
    # The first mirror does not answer (nothing listens on port 9); the second is the local HTTPS server.
    manifest = data.Manifest(("https://127.0.0.1:9/", url), manifest.files)
    fetched = fetch_all(manifest, tmp_path / "raw")
    np.testing.assert_array_equal(fetched["train_labels"], arrays["train_labels"])


def test_https_mirror_serving_uncompressed_files(https_mirror, fake_mnist, tmp_path, monkeypatch):
    url, mirror = https_mirror
    _, manifest_path, arrays = fake_mnist
    for key in IDX_NAMES:
        archive = mirror / f"{IDX_NAMES[key]}.gz"
        (mirror / IDX_NAMES[key]).write_bytes(gzip.decompress(archive.read_bytes()))
        archive.unlink()
    monkeypatch.setenv("MNIST_MIRROR", url)
    fetched = fetch_all(load_manifest(manifest_path), tmp_path / "raw")
    np.testing.assert_array_equal(fetched["test_images"], arrays["test_images"])


@pytest.mark.reliability
def test_mirror_that_does_not_answer_is_named(fake_mnist, tmp_path, monkeypatch):
    _, manifest_path, _ = fake_mnist
    monkeypatch.setenv("MNIST_MIRROR", "https://127.0.0.1:9/mnist")
    with pytest.raises(DataError, match=r"https://127\.0\.0\.1:9/mnist/train-images-idx3-ubyte\.gz: could not be"):
        fetch_all(load_manifest(manifest_path), tmp_path / "raw")


def test_all_mirrors_failing_lists_each(fake_mnist, tmp_path, monkeypatch):
    _, manifest_path, _ = fake_mnist
    monkeypatch.delenv("MNIST_MIRROR", raising=False)
    manifest = load_manifest(manifest_path)
    manifest = data.Manifest(("https://127.0.0.1:9/a", "https://127.0.0.1:9/b"), manifest.files)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: no mirror gave a valid file: .*/a/.*; .*/b/"):
        fetch_all(manifest, tmp_path / "raw")


# --- prepared storage -------------------------------------------------------------------------------------------

def prepared(fake_mnist, tmp_path, monkeypatch, **data_params) -> data.PreparedData:
    """The fake MNIST prepared with `data_params` over the shipped data params, saved and read back."""
    mirror, manifest_path, _ = fake_mnist
    monkeypatch.setenv("MNIST_MIRROR", str(mirror))
    cfg = params_with(data=data_params).data
    tmp_path.mkdir(parents=True, exist_ok=True)
    data.save_prepared(data.prepare(load_manifest(manifest_path), tmp_path / "raw", cfg), tmp_path / "prepared.npz")
    return data.load_prepared(tmp_path / "prepared.npz")


def test_prepared_data_round_trips_bit_packed(fake_mnist, tmp_path, monkeypatch):
    arrays = fake_mnist[2]
    loaded = prepared(fake_mnist, tmp_path, monkeypatch, validation_size=0, train_limit=200)
    assert loaded.train.images.shape == (200, 28, 28) and loaded.validation is None
    assert loaded.test.images.shape == (100, 28, 28)
    np.testing.assert_array_equal(loaded.train.images, binarize(arrays["train_images"][:200], 0.5))
    np.testing.assert_array_equal(loaded.test.labels, arrays["test_labels"])
    summary = data.summarize(loaded, params_with(data={"validation_size": 0}).data)
    assert summary["train"]["images"] == 200 and "validation" not in summary
    assert summary["test"]["fraction_on"] == pytest.approx(binarize(arrays["test_images"], 0.5).mean(), abs=1e-6)
    assert (tmp_path / "prepared.npz").stat().st_size < 200 * 98 + 100 * 98 + 10_000  # 98 bytes an image


def test_the_validation_set_is_held_out_of_the_training_images_at_random_and_stored(fake_mnist, tmp_path,
                                                                                     monkeypatch):
    arrays = fake_mnist[2]
    loaded = prepared(fake_mnist, tmp_path, monkeypatch, validation_size=60, train_limit=200)
    validation, train = loaded.validation.indices, loaded.train.indices
    assert len(validation) == 60 and len(train) == 200  # the limit applies to what is left: 240 images
    assert not set(validation) & set(train)
    assert validation.max() > 200 and set(validation) != set(range(60))  # drawn from all 300, not the first ones
    np.testing.assert_array_equal(loaded.validation.images, binarize(arrays["train_images"][validation], 0.5))
    np.testing.assert_array_equal(loaded.validation.labels, arrays["train_labels"][validation])
    assert list(train) == sorted(train) and list(validation) == sorted(validation)  # each in the file's order
    assert data.summarize(loaded, params_with(data={"validation_size": 60}).data)["validation"]["images"] == 60


def test_the_same_validation_seed_gives_the_same_split_and_another_seed_another(fake_mnist, tmp_path, monkeypatch):
    first = prepared(fake_mnist, tmp_path / "a", monkeypatch, validation_size=50).validation.indices
    again = prepared(fake_mnist, tmp_path / "b", monkeypatch, validation_size=50).validation.indices
    other = prepared(fake_mnist, tmp_path / "c", monkeypatch, validation_size=50, validation_seed=1).validation.indices
    np.testing.assert_array_equal(first, again)
    assert set(first) != set(other)


def test_a_validation_set_as_large_as_the_training_set_is_refused_naming_the_key(fake_mnist, tmp_path, monkeypatch):
    with pytest.raises(ParamsError, match=r"^params.yaml: data.validation_size must be less than the 300 training "
                                          r"images, got 300$"):
        prepared(fake_mnist, tmp_path, monkeypatch, validation_size=300)


@pytest.mark.reliability
def test_prepared_data_with_pickled_objects_is_refused(tmp_path):
    np.savez(tmp_path / "evil.npz", train_images=np.array([object()], dtype=object))
    with pytest.raises(DataError, match="damaged prepared data"):
        data.load_prepared(tmp_path / "evil.npz")


def test_missing_prepared_data_says_what_to_run(tmp_path):
    with pytest.raises(DataError, match="run `dvc repro prepare` first"):
        data.load_prepared(tmp_path / "absent.npz")
