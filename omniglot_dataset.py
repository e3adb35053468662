"""The Omniglot data set (Lake, Salakhutdinov and Tenenbaum, Science 2015) as 28x28 images.

`Omniglot().train` holds the 30 background alphabets (964 characters) and
`Omniglot().test` the 20 evaluation alphabets (659 characters), 20 drawings of
each character; `.data["images"]` is `[N, 28, 28, 1]` float32 ink in [0, 1]
and `.data["labels"]` is `[N]` int32, the character's index within its split.
`.alphabets[label]` names the alphabet of each character, or `.alphabets` is
None where the data names none (see `ALPHABETS_FILE`).

The data comes from the first of:
1. the npz file named by the environment variable `OMNIGLOT_DATA` (never
   downloads);
2. `omniglot.npz` in the Keras cache, `$KERAS_HOME/datasets` (by default
   `~/.keras/datasets`);
3. the original release zips, downloaded from `OMNIGLOT_URL` (by default the
   data set's own repository), verified against their md5 sums, converted and
   written atomically to the cache of 2.
"""
import contextlib
import csv
import glob
import os
import socket
import stat
import sys
import tempfile
import zipfile

import numpy as np

RELEASE_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"
# The release files of each split and their md5 sums, as a public mirror of the release lists them.
RELEASE_FILES = {
    "train": ("images_background.zip", "68d2efa1b9178cc56df9314c21c6e718"),
    "test": ("images_evaluation.zip", "6b91aef0f799c5bb55b94e3f2daec811"),
}
CACHE_FILE = "omniglot.npz"
# Each character's alphabet: the npz's own `{split}_alphabets`, which a download writes, else this file beside the
# npz (split,label,file_prefix,alphabet,character: one row a character), else none.
ALPHABETS_FILE = "characters.csv"
DOWNLOAD_TIMEOUT = 60  # seconds a server may stay silent before a download fails


class DataError(Exception):
    """The data set cannot be read or made; the message says which file and how to fix it."""


def write_atomically(path, save, suffix):
    """Calls `save` on a temporary path beside `path`, then renames it: a kill leaves the old file or the new.

    The temporary file is `.NAME.*SUFFIX` beside `path`: `leftovers(path)` finds those that a kill left.
    """
    folder, name = os.path.split(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=suffix, dir=folder)
    os.close(handle)
    try:
        save(temporary)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # as open() would make it, not mkstemp's owner-only 0o600
        os.replace(temporary, path)
    except BaseException:
        # Gone if the rename was done: an interruption after it leaves the new file, whole.
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def leftovers(path):
    """The temporary files of writes of `path` that were killed before their rename."""
    folder, name = os.path.split(os.path.abspath(path))
    return glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*"))


def not_a_file(path):
    """What `path` is if it exists and is no regular file (a folder, a named pipe, a device), else None.

    Reading a named pipe or a device would wait forever, or read without end.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    kinds = [(stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a device"),
             (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket")]
    return next((kind for test, kind in kinds if test(mode)), "not a regular file")


def unwritable(folder):
    """Why no file can be written in `folder` (or in the folders that would be made for it), or None if one can.

    Tried by writing a temporary file: permissions, a read-only file system and a file in the way all show.
    """
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        return f"cannot write in {existing} ({error.strerror})"
    return None


def cache_dir():
    """The Keras cache directory for data sets, read from `KERAS_HOME` at call time."""
    keras_home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    return os.path.join(keras_home, "datasets")


def convert_release_zip(path):
    """Returns `(images, prefixes, drawings, alphabets)` of the PNGs in a release zip, as `to_28x28` converts them.

    `images` is `[N, 28, 28, 1]` uint8, ordered by the file name `<set>/<alphabet>/characterNN/PPPP_DD.png`: the
    character's prefix PPPP, then the drawing DD; `alphabets` holds each image's alphabet, its folder's name.
    """
    with zipfile.ZipFile(path) as archive:
        names = sorted((name for name in archive.namelist() if name.endswith(".png")), key=os.path.basename)
        pngs = [archive.read(name) for name in names]
    stems = [os.path.basename(name)[:-len(".png")].split("_") for name in names]
    prefixes = np.array([int(prefix) for prefix, _ in stems], np.int32)
    drawings = np.array([int(drawing) for _, drawing in stems], np.int32)
    alphabets = np.array([name.split("/")[-3] for name in names])
    return to_28x28(pngs), prefixes, drawings, alphabets


def to_28x28(pngs):
    """The release's drawings, PNG files of 105x105 white paper, as `[N, 28, 28, 1]` uint8 ink: inverted,
    area-averaged down to 28x28, scaled to 0..255 and rounded."""
    import keras
    import tensorflow as tf

    chunk = 1024  # images resized at once: bounds memory at about 50 MB of 105x105 floats
    images = np.empty([len(pngs), 28, 28, 1], np.uint8)
    progress = keras.utils.Progbar(len(pngs), unit_name="image")
    for start in range(0, len(pngs), chunk):
        paper = tf.stack([tf.io.decode_png(png, channels=1) for png in pngs[start:start + chunk]])
        ink = 1 - tf.cast(paper, tf.float32) / 255
        resized = tf.image.resize(ink, [28, 28], method="area")
        images[start:start + chunk] = np.round(resized.numpy() * 255).astype(np.uint8)
        progress.add(len(paper))
    return images


def download(fname, md5, base_url):
    """Downloads a release file into the cache with `keras.utils.get_file`; a failed one leaves nothing."""
    import keras

    origin = base_url.rstrip("/") + "/" + fname
    target = os.path.join(cache_dir(), fname)
    os.makedirs(cache_dir(), exist_ok=True)  # get_file falls back to /tmp for a cache that does not exist yet
    silence = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)  # get_file has no time limit of its own
    try:
        return keras.utils.get_file(fname, origin=origin, file_hash=md5, cache_dir=os.path.dirname(cache_dir()))
    except (Exception, KeyboardInterrupt) as error:
        # get_file keeps a file that fails its checksum; a cache must hold only verified files.
        if os.path.exists(target):
            os.remove(target)
        if isinstance(error, KeyboardInterrupt):
            raise
        if isinstance(error, TimeoutError) or "timed out" in str(error):
            error = f"no answer within {DOWNLOAD_TIMEOUT} s"
        raise DataError(f"cannot download {origin}: {error}; nothing was left in {cache_dir()}") from None
    finally:
        socket.setdefaulttimeout(silence)


def download_and_convert(path):
    """Downloads both release zips, converts them, and writes the npz file `path` atomically."""
    base_url = os.environ.get("OMNIGLOT_URL", RELEASE_URL)
    arrays = {}
    for split, (fname, md5) in RELEASE_FILES.items():
        zip_path = download(fname, md5, base_url)
        print(f"Converting {fname}", file=sys.stderr)
        images, prefixes, _, alphabets = convert_release_zip(zip_path)
        arrays[f"{split}_images"] = images
        # A character's label is its rank within its split: the order of characters.csv.
        _, first_image, labels = np.unique(prefixes, return_index=True, return_inverse=True)
        arrays[f"{split}_labels"] = labels.astype(np.int32)
        arrays[f"{split}_alphabets"] = alphabets[first_image]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomically(path, lambda temporary: np.savez_compressed(temporary, **arrays), suffix=".npz")


def load_npz(path, fix):
    """Reads and checks the course-layout npz file `path`; `fix` says how a user repairs a bad one."""
    if kind := not_a_file(path):
        raise DataError(f"cannot read {path}: it is {kind}, not a file; {fix}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except Exception as error:
        raise DataError(f"cannot read {path} as an npz file ({error}); {fix}") from None
    for split in ["train", "test"]:
        images, labels = arrays.get(f"{split}_images"), arrays.get(f"{split}_labels")
        if images is None or labels is None:
            raise DataError(f"{path} lacks the arrays {split}_images and {split}_labels; {fix}")
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (Omniglot.H, Omniglot.W, Omniglot.C):
            raise DataError(f"{path}: {split}_images is {images.dtype} {images.shape}, "
                            f"expected uint8 [N, {Omniglot.H}, {Omniglot.W}, {Omniglot.C}]; {fix}")
        if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{path}: {split}_labels is {labels.dtype} {labels.shape}, "
                            f"expected integers, one per image ({len(images)}); {fix}")
        # Checked before they become int32, which would wrap larger ones onto other characters.
        if len(labels) and (labels.min() < 0 or labels.max() > np.iinfo(np.int32).max):
            raise DataError(f"{path}: {split}_labels run from {labels.min()} to {labels.max()}, "
                            f"expected labels 0..{np.iinfo(np.int32).max}; {fix}")
    characters = {split: int(arrays[f"{split}_labels"].max(initial=-1)) + 1 for split in ["train", "test"]}
    alphabets_file = os.path.join(os.path.dirname(path), ALPHABETS_FILE)
    if not any(f"{split}_alphabets" in arrays for split in characters) and os.path.isfile(alphabets_file):
        arrays.update(read_alphabets(alphabets_file, characters))
    for split in ["train", "test"]:
        alphabets = arrays.get(f"{split}_alphabets")
        if alphabets is not None and (alphabets.dtype.kind != "U" or alphabets.shape != (characters[split],)):
            raise DataError(f"{path}: {split}_alphabets is {alphabets.dtype} {alphabets.shape}, expected "
                            f"{characters[split]} names, one a character; {fix}")
    return arrays


def read_alphabets(path, characters):
    """`{split}_alphabets` of a characters.csv: the alphabet of each of a split's `characters[split]` labels."""
    fix = "fix it or remove it"
    try:
        with open(path, newline="") as file:
            rows = list(csv.DictReader(file))
        alphabets = {split: {int(row["label"]): row["alphabet"] for row in rows if row["split"] == split}
                     for split in characters}
    except (OSError, UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError) as error:
        raise DataError(f"cannot read {path} ({error!r}): expected the columns split, label and alphabet; "
                        f"{fix}") from None
    for split, count in characters.items():
        if sorted(alphabets[split]) != list(range(count)) or not all(alphabets[split].values()):
            raise DataError(f"{path} does not name an alphabet for each of the {count} characters of the {split} "
                            f"split, labels 0 to {count - 1}, once each; {fix}")
    return {f"{split}_alphabets": np.array([names[label] for label in range(len(names))])
            for split, names in alphabets.items()}


class Omniglot:
    H, W, C = 28, 28, 1
    CHARACTERS = {"train": 964, "test": 659}  # of each split in the release

    class Dataset:
        def __init__(self, images, labels, alphabets=None):
            self._data = {"images": images.astype(np.float32) / 255, "labels": labels.astype(np.int32)}
            self._size = len(labels)
            self.alphabets = alphabets  # of each label, or None

        @property
        def data(self):
            return self._data

        @property
        def size(self):
            return self._size

    def __init__(self):
        path = os.environ.get("OMNIGLOT_DATA")
        if path:
            arrays = load_npz(path, fix="point OMNIGLOT_DATA at a good copy, or unset it to use the Keras cache")
        else:
            path = os.path.join(cache_dir(), CACHE_FILE)
            if not os.path.exists(path):
                if problem := unwritable(cache_dir()):
                    raise DataError(f"cannot cache the data set in {cache_dir()}: {problem}; set KERAS_HOME to "
                                    "a writable folder, or OMNIGLOT_DATA to a copy of omniglot.npz")
                download_and_convert(path)
            arrays = load_npz(path, fix="remove it, and the next run downloads the data set again")
        for split in ["train", "test"]:
            setattr(self, split, self.Dataset(arrays[f"{split}_images"], arrays[f"{split}_labels"],
                                              arrays.get(f"{split}_alphabets")))
        self.path = path
