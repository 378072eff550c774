"""The sample data: the real histology image and its painted nuclei; the real 3D stacks that are
downloaded on first use."""

import os
from pathlib import Path

import h5py
import numpy as np
import pooch
import pytest
import tifffile
from scipy import ndimage
from skimage.color import rgb2hed

from napari_sparseseg.core.errors import SparseSegError
from napari_sparseseg.core.real_samples import REAL_SAMPLES, Remote, content_hash, load_real_sample, read_remote
from napari_sparseseg.core.samples import HISTOLOGY_POINTS, histology_nuclei
from napari_sparseseg.core.scale import object_diameters

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def test_histology_sample_paints_one_nucleus_under_each_point():
    rgb, sparse = histology_nuclei()
    assert rgb.shape == (512, 512, 3) and rgb.dtype == np.uint8
    assert sparse.shape == (512, 512) and sparse.dtype == np.int32
    for i, p in enumerate(HISTOLOGY_POINTS, start=1):
        assert sparse[p] == i
        assert ndimage.label(sparse == i)[1] == 1  # one piece each
    # nucleus-sized (8-25 px across), most of the image left unlabeled
    d = object_diameters(sparse)
    assert len(d) == len(HISTOLOGY_POINTS) and 8 < d.min() and d.max() < 25
    assert (sparse > 0).mean() < 0.02
    # painted where the hematoxylin (nuclear) stain is: brighter inside than in the rest of the image
    h = rgb2hed(rgb)[..., 0]
    assert h[sparse > 0].mean() > h[sparse == 0].mean() + 2 * h[sparse == 0].std() / np.sqrt(len(d))


# --- real 3D samples, downloaded on first use (core/real_samples.py) -------------------------------
# No test reaches the network: pooch.retrieve is replaced by a writer of the arrays the test gives.

URL = "https://example.org/owner/repo/0123456789abcdef/sample.h5"


def serve(monkeypatch, files: dict[str, dict[str, np.ndarray]]):
    """pooch.retrieve writes ``files[url]`` (datasets by key) as an HDF5 file; returns the calls."""
    calls = []

    def retrieve(url, known_hash, fname, path, progressbar):
        calls.append(url)
        out = os.path.join(path, fname)
        os.makedirs(path, exist_ok=True)
        with h5py.File(out, "w") as f:
            for key, arr in files[url].items():
                f.create_dataset(key, data=arr)
        return out

    monkeypatch.setattr(pooch, "retrieve", retrieve)
    return calls


def test_content_hash_of_labels_ignores_ids_but_not_objects():
    lab = np.array([[0, 0, 5], [7, 7, 5]])
    assert content_hash(lab, labels=True) == content_hash(lab * 3 + 1, labels=True)
    assert content_hash(lab.astype(np.uint16), labels=True) == content_hash(lab, labels=True)
    moved = lab.copy()
    moved[0, 1] = 7
    assert content_hash(moved, labels=True) != content_hash(lab, labels=True)
    assert content_hash(lab) != content_hash(lab * 3 + 1)  # an image's values count
    with pytest.raises(SparseSegError, match="expected an integer array, got float64"):
        content_hash(lab.astype(float))


def test_read_remote_downloads_once_and_checks_the_contents(monkeypatch, tmp_path):
    raw = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    calls = serve(monkeypatch, {URL: {"raw": raw}})
    remote = Remote(URL, "raw", content_hash(raw))
    np.testing.assert_array_equal(read_remote(remote, tmp_path), raw)
    np.testing.assert_array_equal(read_remote(remote, tmp_path), raw)
    assert calls == [URL]  # the second read comes from the cache
    assert (tmp_path / "repo-01234567-sample.h5").exists()


def test_read_remote_refuses_a_file_that_is_not_the_published_one(monkeypatch, tmp_path):
    raw = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    altered = raw.copy()
    altered[0, 0, 0] = 99
    serve(monkeypatch, {URL: {"raw": altered}})
    with pytest.raises(SparseSegError, match=r"sample\.h5: dataset 'raw' is not the published one .*"
                                             r"delete the file to download it again"):
        read_remote(Remote(URL, "raw", content_hash(raw)), tmp_path)


def test_read_remote_names_a_missing_dataset(monkeypatch, tmp_path):
    serve(monkeypatch, {URL: {"image": np.zeros((2, 2), np.uint8)}})
    with pytest.raises(SparseSegError, match=r"no dataset 'raw' \(it has image\)"):
        read_remote(Remote(URL, "raw", "0" * 64), tmp_path)


def test_read_remote_names_a_file_that_is_not_hdf5(tmp_path):
    (tmp_path / "repo-01234567-sample.h5").write_text("<html>rate limited</html>")
    with pytest.raises(SparseSegError, match=r"sample\.h5: not a readable HDF5 file .*delete it to download it again"):
        read_remote(Remote(URL, "raw", "0" * 64), tmp_path)


def test_download_failure_says_where_to_put_the_file(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(pooch, "retrieve", offline)
    monkeypatch.setenv("SPARSESEG_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SparseSegError) as err:
        read_remote(Remote(URL, "raw", "0" * 64))
    msg = str(err.value)
    assert f"could not download {URL} (ConnectionError: no route to host)" in msg
    assert str(tmp_path / "cache" / "repo-01234567-sample.h5") in msg


# --- the same over real HTTP: a server on this machine, pooch's own download -------------------
@pytest.fixture
def http_root(tmp_path):
    """A folder served over HTTP on 127.0.0.1 (a thread; stopped after the test): (folder, base URL).
    A file whose name ends in ``.cut`` is sent with a Content-Length twice its size, then the
    connection is closed: a download that breaks off."""
    import http.server
    import threading
    from functools import partial

    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            path = Path(self.translate_path(self.path))
            if path.suffix != ".cut":
                return super().do_GET()
            body = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(2 * len(body)))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _publish(root: Path, name: str, arrays: dict[str, np.ndarray]) -> str:
    """Writes an HDF5 file at ``root/owner/repo/<commit>/name``; returns its path under the server."""
    rel = f"owner/repo/0123456789abcdef/{name}"
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(root / rel, "w") as f:
        for key, arr in arrays.items():
            f.create_dataset(key, data=arr)
    return rel


def test_read_remote_downloads_over_http_once(http_root, tmp_path):
    root, base = http_root
    raw = np.arange(60, dtype=np.uint16).reshape(3, 4, 5)
    url = f"{base}/{_publish(root, 'sample.h5', {'raw': raw})}"
    cache = tmp_path / "cache"
    np.testing.assert_array_equal(read_remote(Remote(url, "raw", content_hash(raw)), cache), raw)
    assert [p.name for p in cache.iterdir()] == ["repo-01234567-sample.h5"]
    (root / "owner").rename(root / "gone")  # the server no longer has it: the cache answers
    np.testing.assert_array_equal(read_remote(Remote(url, "raw", content_hash(raw)), cache), raw)


def test_http_error_says_what_failed_and_leaves_no_file(http_root, tmp_path):
    _, base = http_root
    url = f"{base}/owner/repo/0123456789abcdef/missing.h5"
    cache = tmp_path / "cache"
    expected = (rf"could not download {url} \(HTTPError: 404 .*; try again, or download that file .*, "
                rf"copy it to .*repo-01234567-missing\.h5 and open the sample again")
    with pytest.raises(SparseSegError, match=expected):
        read_remote(Remote(url, "raw", "0" * 64), cache)
    assert not (cache / "repo-01234567-missing.h5").exists()


def test_broken_off_download_leaves_no_file_behind(http_root, tmp_path):
    root, base = http_root
    rel = _publish(root, "sample.h5.cut", {"raw": np.zeros((4, 64, 64), np.uint8)})
    url = f"{base}/{rel}"
    cache = tmp_path / "cache"
    with pytest.raises(SparseSegError, match=rf"could not download {url} \("):
        read_remote(Remote(url, "raw", "0" * 64), cache)
    # nothing half-written where the next try (or the user's copy) goes
    assert not (cache / "repo-01234567-sample.h5.cut").exists()


def test_unknown_real_sample_lists_the_choices():
    with pytest.raises(SparseSegError, match="real sample 'cells': expected one of ovule, fibsem"):
        load_real_sample("cells")


SHARED = {  # the published arrays, as ../shared/data holds them
    "ovule": ("ovule_sample/sample_ovule_raw.tif", "ovule_sample/sample_ovule_label.tif", 5),
    "fibsem": ("fibsem_gala/train_raw.tif", "fibsem_gala/train_gt.tif", 9),
}


@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="needs ../shared/data (the published arrays)")
@pytest.mark.parametrize("key", list(SHARED))
def test_real_sample_paints_a_few_complete_objects_of_the_published_stack(monkeypatch, tmp_path, key):
    raw_file, gt_file, n_painted = SHARED[key]
    raw = tifffile.imread(os.path.join(SHARED_DATA, raw_file))
    gt = tifffile.imread(os.path.join(SHARED_DATA, gt_file))
    sample = REAL_SAMPLES[key]
    files: dict = {}
    files.setdefault(sample.image.url, {})[sample.image.key] = raw
    files.setdefault(sample.labels.url, {})[sample.labels.key] = np.where(gt > 0, gt * 2 + 1, 0)  # other ids
    serve(monkeypatch, files)
    img, sparse, dense, desc = load_real_sample(key, tmp_path)
    np.testing.assert_array_equal(img, raw)
    assert desc is sample and sparse.dtype == np.int32 and sparse.shape == gt.shape
    assert content_hash(dense, labels=True) == content_hash(gt, labels=True) and dense.max() == len(np.unique(gt)) - 1
    ids = np.unique(sparse[sparse > 0])
    assert len(ids) == n_painted
    for i in ids:  # each painted object is one whole ground-truth object
        under = np.unique(gt[sparse == i])
        assert len(under) == 1 and under[0] != 0
        np.testing.assert_array_equal(sparse == i, gt == under[0])
    # the painted objects do not depend on the ids the file gives them
    files[sample.labels.url][sample.labels.key] = gt
    for f in tmp_path.iterdir():
        f.unlink()
    np.testing.assert_array_equal(load_real_sample(key, tmp_path)[1] > 0, sparse > 0)
