"""Reading, downloading and converting Omniglot, offline: a loopback HTTP server serves the release zips."""
import csv
import hashlib
import http.server
import os
import shutil
import socket
import threading
import zipfile

import numpy as np
import pytest
import tensorflow as tf

import omniglot_dataset
from conftest import SHARED_OMNIGLOT
from omniglot_dataset import DataError, Omniglot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Keras cache, and no OMNIGLOT_DATA: Omniglot() must download."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.delenv("OMNIGLOT_DATA", raising=False)
    return tmp_path / "keras" / "datasets"


def md5(path):
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def publish(folder, monkeypatch, files):
    """Serves `files` ({release name: local zip}) and pins their md5 sums as the release's."""
    release = {}
    for split, (name, source) in files.items():
        shutil.copy(source, folder / name)
        release[split] = (name, md5(folder / name))
    monkeypatch.setattr(omniglot_dataset, "RELEASE_FILES", release)


def test_download_converts_the_release_bit_for_bit(serve, offline_cache, monkeypatch, omniglot_npz):
    # The two small release zips stand in for the background and evaluation zips.
    folder, url = serve
    small1 = os.path.join(SHARED_OMNIGLOT, "images_background_small1.zip")
    small2 = os.path.join(SHARED_OMNIGLOT, "images_background_small2.zip")
    if not (os.path.exists(small1) and os.path.exists(small2)):
        pytest.skip(f"needs the release's small zips in {SHARED_OMNIGLOT}")
    publish(folder, monkeypatch, {"train": ("images_background.zip", small1),
                                  "test": ("images_evaluation.zip", small2)})
    monkeypatch.setenv("OMNIGLOT_URL", url)

    with open(os.path.join(SHARED_OMNIGLOT, "characters.csv")) as file:
        listed = {row["file_prefix"]: row["alphabet"] for row in csv.DictReader(file) if row["split"] == "train"}
    omniglot = Omniglot()
    cache = np.load(offline_cache / "omniglot.npz")
    reference = np.load(omniglot_npz)["train_images"]
    for split, source in [("train", small1), ("test", small2)]:
        # PPPP_DD.png is entry (PPPP - 1) * 20 + DD - 1 of the reference train_images.
        names = sorted(os.path.basename(n) for n in zipfile.ZipFile(source).namelist() if n.endswith(".png"))
        index = np.array([(int(n[:4]) - 1) * 20 + int(n[5:7]) - 1 for n in names])
        np.testing.assert_array_equal(cache[f"{split}_images"], reference[index])
        prefixes = np.array([int(n[:4]) for n in names])
        # Labels count characters from 0 in prefix order, as characters.csv does.
        np.testing.assert_array_equal(cache[f"{split}_labels"], np.searchsorted(np.unique(prefixes), prefixes))
        dataset = getattr(omniglot, split)
        assert dataset.size == len(names) and dataset.data["images"].dtype == np.float32
        # Each character's alphabet is its folder's name, as characters.csv lists it for its prefix.
        with zipfile.ZipFile(source) as archive:
            folders = {os.path.basename(n)[:4]: n.split("/")[1] for n in archive.namelist() if n.endswith(".png")}
        assert dataset.alphabets.tolist() == [folders[f"{prefix:04d}"] for prefix in np.unique(prefixes)]
        assert dataset.alphabets.tolist() == [listed[f"{prefix:04d}"] for prefix in np.unique(prefixes)]
        np.testing.assert_array_equal(dataset.data["images"], reference[index] / np.float32(255))
    assert sorted(os.listdir(offline_cache)) == ["images_background.zip", "images_evaluation.zip", "omniglot.npz"]

    # Later runs read the cache: the server may be gone.
    monkeypatch.setenv("OMNIGLOT_URL", "http://127.0.0.1:9/")
    os.remove(offline_cache / "images_background.zip")
    assert Omniglot().train.size == omniglot.train.size


def tiny_release_zip(path, prefix):
    """A release-style zip of one character with two drawings."""
    with zipfile.ZipFile(path, "w") as archive:
        for drawing in [1, 2]:
            paper = np.full([105, 105, 1], 255, np.uint8)
            paper[10 * drawing:50, 20:60] = 0
            name = f"set/Alphabet/character01/{prefix:04d}_{drawing:02d}.png"
            archive.writestr(name, tf.io.encode_png(paper).numpy())


def test_wrong_checksum_fails_clearly_and_leaves_no_cache(serve, offline_cache, monkeypatch, tmp_path):
    folder, url = serve
    tiny_release_zip(tmp_path / "a.zip", 1)
    tiny_release_zip(tmp_path / "b.zip", 2)
    publish(folder, monkeypatch, {"train": ("images_background.zip", tmp_path / "a.zip"),
                                  "test": ("images_evaluation.zip", tmp_path / "b.zip")})
    name, _ = omniglot_dataset.RELEASE_FILES["test"]
    omniglot_dataset.RELEASE_FILES["test"] = (name, "0" * 32)
    monkeypatch.setenv("OMNIGLOT_URL", url)

    with pytest.raises(DataError, match=r"images_evaluation\.zip.*hash.*nothing was left"):
        Omniglot()
    # Only the verified zip of the other split stays: no bad zip, no cache, no temporary file.
    assert os.listdir(offline_cache) == ["images_background.zip"]


def test_missing_file_on_the_server_fails_clearly(serve, offline_cache, monkeypatch):
    _, url = serve
    monkeypatch.setenv("OMNIGLOT_URL", url)
    with pytest.raises(DataError, match=r"cannot download .*images_background\.zip.*404"):
        Omniglot()
    assert os.listdir(offline_cache) == []


def test_omniglot_data_names_the_file_to_read(monkeypatch, omniglot_npz, tmp_path):
    monkeypatch.setenv("OMNIGLOT_DATA", omniglot_npz)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    omniglot = Omniglot()
    assert (omniglot.train.size, omniglot.test.size) == (19280, 13180)
    assert len(np.unique(omniglot.train.data["labels"])) == 964
    assert len(np.unique(omniglot.test.data["labels"])) == 659
    assert omniglot.train.data["images"].shape == (19280, Omniglot.H, Omniglot.W, Omniglot.C)
    assert not (tmp_path / "keras").exists(), "OMNIGLOT_DATA must never download"


def test_missing_omniglot_data_file_is_refused_without_download(monkeypatch, tmp_path):
    monkeypatch.setenv("OMNIGLOT_DATA", str(tmp_path / "nothing.npz"))
    monkeypatch.setenv("OMNIGLOT_URL", "http://127.0.0.1:9/")
    with pytest.raises(DataError, match="nothing.npz.*OMNIGLOT_DATA"):
        Omniglot()


def test_download_cut_off_halfway_leaves_nothing(offline_cache, monkeypatch):
    class CutOffHandler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            self.wfile.write(b"PK" + b"\0" * 4000)  # then the connection closes

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CutOffHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("OMNIGLOT_URL", f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(DataError, match=r"cannot download .*images_background\.zip.*nothing was left"):
            Omniglot()
    finally:
        server.shutdown()
        server.server_close()
    assert os.listdir(offline_cache) == []


def test_a_server_that_never_answers_is_given_up_on(offline_cache, monkeypatch):
    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections, never answers
    monkeypatch.setattr(omniglot_dataset, "DOWNLOAD_TIMEOUT", 1)
    try:
        monkeypatch.setenv("OMNIGLOT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        with pytest.raises(DataError, match=r"cannot download http://127\.0\.0\.1:\d+/images_background\.zip: "
                                            r"no answer within 1 s; nothing was left in "):
            Omniglot()
    finally:
        silent.close()
    assert os.listdir(offline_cache) == []
    assert socket.getdefaulttimeout() is None, "the time limit is the download's alone"


def characters_csv(path, rows):
    with open(path, "w", newline="") as file:
        file.write("split,label,file_prefix,alphabet,character\n")
        file.writelines(f"{split},{label},{label + 1:04d},{alphabet},character01\n" for split, label, alphabet in rows)


def test_alphabets_come_from_a_characters_csv_beside_the_npz(tmp_path, monkeypatch, omniglot_npz):
    arrays = dict(np.load(omniglot_npz))
    np.savez(tmp_path / "omniglot.npz", **{key: arrays[key] for key in ["train_images", "train_labels",
                                                                         "test_images", "test_labels"]})
    monkeypatch.setenv("OMNIGLOT_DATA", str(tmp_path / "omniglot.npz"))
    assert Omniglot().train.alphabets is None and Omniglot().test.alphabets is None

    # Rows in any order; a character's alphabet is found by its label.
    rows = [(split, label, f"{split}{label % 7}") for split, count in Omniglot.CHARACTERS.items()
            for label in range(count)]
    characters_csv(tmp_path / "characters.csv", rows[::-1])
    omniglot = Omniglot()
    assert omniglot.train.alphabets.tolist() == [f"train{label % 7}" for label in range(964)]
    assert omniglot.test.alphabets.tolist() == [f"test{label % 7}" for label in range(659)]

    characters_csv(tmp_path / "characters.csv", rows[1:])
    with pytest.raises(DataError, match=rf"^{tmp_path / 'characters.csv'} does not name an alphabet for each of "
                                        r"the 964 characters of the train split, labels 0 to 963, once each"):
        Omniglot()
    (tmp_path / "characters.csv").write_text("split,label\ntrain,0\n")
    with pytest.raises(DataError, match=r"cannot read .*characters.csv \(KeyError\('alphabet'\)\): expected the "
                                        "columns split, label and alphabet; fix it or remove it"):
        Omniglot()
