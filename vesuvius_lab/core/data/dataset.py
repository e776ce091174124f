"""The data a project trains on: the csv index, folds grouped by scroll, a memory-mapped volume
cache and the integrity check behind ``vlab data check``.

The layout is the competition's::

    train.csv            id,scroll_id
    test.csv             id,scroll_id
    train_images/<id>.tif   train_labels/<id>.tif   test_images/<id>.tif

Volumes are uint8 (D, H, W) multi-page TIFFs; labels are 0 background, 1 surface, 2 unlabeled.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal, Sequence

import numpy as np

from vesuvius_lab.core.data.array_cache import entry_problem, read_array, remove, write_array
from vesuvius_lab.core.config.text import TextFileError, read_text
from vesuvius_lab.core.console import err
from vesuvius_lab.core.data.tiff import VolumeError, read_tiff, read_volume, volume_problems
from vesuvius_lab.core.errors import UserError, absence

#: The label value of voxels that no loss or metric looks at ("unlabeled"); padding gets it.
IGNORE_LABEL = 2

Split = Literal["train", "test"]
GroupBy = Literal["scroll_id", "id"]
LABEL_VALUES = (0, 1, 2)
SUFFIX = ".tif"
#: Volume ids become file names: nothing that could climb out of a folder.
SAFE_ID = re.compile(r"(?!\.\.?$)[A-Za-z0-9._-]+")


# --------------------------------------------------------------------------- the csv index


def read_index(path: Path, *, require_scroll: bool = True) -> tuple[dict[str, str], list[str]]:
    """Parse ``train.csv``/``test.csv`` into ``{id: scroll_id}`` (file order) and a list of problems.

    Extra columns are allowed; ``id`` is required, and ``scroll_id`` when ``require_scroll``
    (a missing scroll id is then the empty string).
    """
    path = Path(path)
    try:
        text = read_text(path)
    except TextFileError as exc:  # not "missing" when it is there but unreadable (a folder, a loop, not UTF-8)
        return {}, [f"{path}: missing. Create it with the header `id,scroll_id` and one row per volume."
                    if exc.missing else str(exc)]
    problems: list[str] = []
    rows: dict[str, str] = {}
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [name.strip() for name in next(reader, [])]
    needed = ["id", "scroll_id"] if require_scroll else ["id"]
    missing = [name for name in needed if name not in header]
    if missing:
        found = ",".join(header) or "nothing"
        return {}, [f"{path}: line 1 must be a header with the columns {','.join(needed)}; found {found}. "
                    "Fix the header (the competition's is `id,scroll_id`)."]
    id_col, scroll_col = header.index("id"), header.index("scroll_id") if "scroll_id" in header else None
    for line, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue  # blank lines are harmless
        if len(row) != len(header):
            problems.append(f"{path}: line {line} has {len(row)} fields, the header has {len(header)}. "
                            "Give every row the header's columns.")
            continue
        volume_id = row[id_col].strip()
        scroll = row[scroll_col].strip() if scroll_col is not None else ""
        if not volume_id or (require_scroll and not scroll):
            problems.append(f"{path}: line {line} has an empty {'id' if not volume_id else 'scroll_id'}. "
                            "Fill it in or delete the row.")
        elif not SAFE_ID.fullmatch(volume_id):
            problems.append(f"{path}: line {line} has the id {volume_id!r}; ids name files, so they may only "
                            "hold letters, digits, '.', '_' and '-' (no slashes, no '..'). Rename the volume.")
        elif volume_id in rows:
            problems.append(f"{path}: line {line} repeats the id {volume_id}. Keep one row per volume.")
        else:
            rows[volume_id] = scroll
    return rows, problems


@dataclass(frozen=True)
class Dataset:
    """A data root in the competition layout, as listed by its csv files."""

    root: Path
    train: dict[str, str]  # id -> scroll_id, in train.csv order
    test: dict[str, str] = field(default_factory=dict)  # id -> scroll_id ("" if absent), test.csv order

    @classmethod
    def open(cls, root: Path) -> "Dataset":
        """Read ``train.csv`` (required) and ``test.csv`` (optional); raise :class:`UserError` on a bad csv."""
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"{root}: data folder {absence(root, 'folder')}. Create a demo dataset with "
                            f"`vlab data synth --out "
                            f"{root}`, or point --data / VLAB_DATA / data_root in vesuvius.toml at your data.")
        train, problems = read_index(root / "train.csv")
        test: dict[str, str] = {}
        if os.path.lexists(root / "test.csv"):  # one that cannot be read is reported, not skipped
            test, test_problems = read_index(root / "test.csv", require_scroll=False)
            problems += test_problems
        if problems:
            raise UserError(" ".join(problems) + " Run `vlab data check` for a full report.")
        if not train:
            raise UserError(f"{root / 'train.csv'}: lists no volumes. Add one row per training volume.")
        return cls(root, train, test)

    @property
    def ids(self) -> list[str]:
        """Training volume ids in train.csv order."""
        return list(self.train)

    @property
    def test_ids(self) -> list[str]:
        return list(self.test)

    def scroll_of(self, volume_id: str) -> str:
        if volume_id in self.train:
            return self.train[volume_id]
        if volume_id in self.test:
            return self.test[volume_id]
        raise UserError(f"Volume {volume_id!r} is in neither {self.root / 'train.csv'} nor test.csv.")

    def image_path(self, volume_id: str, split: Split = "train") -> Path:
        return self.root / f"{split}_images" / f"{volume_id}{SUFFIX}"

    def label_path(self, volume_id: str) -> Path:
        return self.root / "train_labels" / f"{volume_id}{SUFFIX}"

    def folds(self, k: int, group_by: GroupBy = "scroll_id", seed: int = 0) -> "Folds":
        """``k`` cross-validation folds of the training volumes (see :func:`make_folds`)."""
        groups = [self.train[i] for i in self.ids] if group_by == "scroll_id" else None
        return make_folds(self.ids, groups, k, seed=seed)


# --------------------------------------------------------------------------- folds


@dataclass(frozen=True)
class Folds:
    """Validation ids of each fold; ``note`` says when the grouping had to change."""

    validation: tuple[tuple[str, ...], ...]
    group_by: GroupBy  # the grouping actually used
    note: str | None = None

    def __len__(self) -> int:
        return len(self.validation)

    def split(self, fold: int) -> tuple[list[str], list[str]]:
        """(training ids, validation ids) of ``fold``."""
        if not 0 <= fold < len(self):
            raise UserError(f"Fold {fold} does not exist: there are {len(self)} folds, numbered 0 to "
                            f"{len(self) - 1}. Set data.fold to one of them.")
        train = [i for f, ids in enumerate(self.validation) if f != fold for i in ids]
        return train, list(self.validation[fold])

    def fold_of(self, volume_id: str) -> int:
        return next(f for f, ids in enumerate(self.validation) if volume_id in ids)


def make_folds(ids: Sequence[str], groups: Sequence[str] | None, k: int, *, seed: int = 0) -> Folds:
    """Split ``ids`` into ``k`` folds so that no group (scroll) is in two folds.

    ``groups[i]`` is the group of ``ids[i]``; ``None`` groups by id. With fewer groups than
    folds the split falls back to grouping by id and says so in :attr:`Folds.note`. Groups are
    dealt, largest first (ties in a seeded order), to the fold holding the fewest volumes, so
    folds are balanced and the same inputs always give the same folds. The seed is separate from
    the training seed on purpose: runs with different seeds should still share their folds.
    """
    ids = list(ids)
    if k < 2:
        raise UserError(f"Cross-validation needs at least 2 folds, got {k}. Set folds to 2 or more.")
    if len(ids) < k:
        raise UserError(f"{k} folds need at least {k} training volumes; train.csv lists {len(ids)}. "
                        f"Set folds (vesuvius.toml) or data.folds (the experiment) to at most {len(ids)}.")
    group_by: GroupBy = "id" if groups is None else "scroll_id"
    note = None
    if groups is not None and len(set(groups)) < k:
        note = (f"only {len(set(groups))} scroll(s) for {k} folds: folds are grouped by volume id instead, "
                "so a scroll can be in training and validation at once (validation scores will be optimistic).")
        groups, group_by = None, "id"
    members: dict[str, list[str]] = {}
    for volume_id, group in zip(ids, groups if groups is not None else ids):
        members.setdefault(group, []).append(volume_id)
    names = sorted(members)
    random.Random(seed).shuffle(names)
    names.sort(key=lambda name: -len(members[name]))  # stable: the shuffle breaks ties
    folds: list[list[str]] = [[] for _ in range(k)]
    for name in names:
        smallest = min(range(k), key=lambda f: (len(folds[f]), f))
        folds[smallest].extend(members[name])
    position = {volume_id: n for n, volume_id in enumerate(ids)}
    return Folds(tuple(tuple(sorted(f, key=position.__getitem__)) for f in folds), group_by, note)


# --------------------------------------------------------------------------- decoding, strictly


# --------------------------------------------------------------------------- the volume cache


def cache_key(path: Path) -> str:
    """A key that changes whenever the file does, without reading all of it.

    Hashing every byte would read the whole compressed file on each open, which is most of what
    the cache saves. The key hashes the resolved path, size and modification time (any rewrite or
    copy changes them) plus the first and last 64 KiB (the TIFF header and the last page's
    directory), which also catches a same-size rewrite whose modification time was preserved.
    """
    path = Path(path).resolve()
    stat = path.stat()
    digest = hashlib.blake2b(digest_size=12)
    digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(65536))
        handle.seek(max(stat.st_size - 65536, 0))
        digest.update(handle.read(65536))
    return digest.hexdigest()


def _cache_prefix(path: Path, kind: str = "") -> str:
    """Entries of one source file (and one kind of derived volume) share this prefix, so stale ones
    can be found and removed without touching the other kinds."""
    return f"{Path(path).stem}-{kind + '-' if kind else ''}{_path_hash(path)}-"


def _path_hash(path: Path) -> str:
    return hashlib.blake2b(str(Path(path).resolve()).encode(), digest_size=4).hexdigest()


@dataclass(frozen=True)
class Derived:
    """A volume computed from a decoded one and cached beside it, e.g. the skeleton targets of a label.

    ``kind`` names it in the cache; change it whenever ``make`` changes what it computes, so that
    older entries are never used. ``make`` takes the decoded (D, H, W) volume."""

    kind: str
    make: Callable[[np.ndarray], np.ndarray]
    describe: str = "derived volume"


def open_volume(path: Path, cache_dir: Path, derived: Derived | None = None) -> np.memmap:
    """The volume at ``path`` as a read-only memory map of its decoded copy under ``cache_dir``
    (with ``derived``: of that volume computed from it, cached the same way).

    The first open decodes the TIFF and writes ``<stem>-<path hash>-<content key>.npy``
    atomically (temporary file, then rename), so concurrent processes (DataLoader workers, DDP
    ranks) never see half a file: at worst two of them decode the same volume and the second
    rename replaces an identical file. Later opens cost a ``stat`` and two small reads, and
    reading a patch reads only that patch's pages from disk. A derived volume's entry carries its
    kind and the source's content key, so it is rebuilt whenever the source file changes.
    """
    path, cache_dir = Path(path), Path(cache_dir)
    if not path.is_file():
        raise VolumeError(f"{path}: file {absence(path)}. Check the data root and the csv ids "
                          "(`vlab data check`).")
    kind = derived.kind if derived is not None else ""
    entry = cache_entry(path, cache_dir, kind)
    cached = read_array(entry)  # None: not cached yet, or a damaged entry (deleted) that is rebuilt below
    if cached is not None:
        return cached
    volume = read_volume(path) if derived is None else derived.make(np.asarray(open_volume(path, cache_dir)))
    write_array(entry, volume)
    _remove_stale(cache_dir, path, kind, keep=entry)
    return np.load(entry, mmap_mode="r")


def cache_entry(path: Path, cache_dir: Path, kind: str = "") -> Path:
    """The cache entry of the TIFF at ``path`` as it is now (decoded, or the ``kind`` derived from it)."""
    return Path(cache_dir) / f"{_cache_prefix(path, kind)}{cache_key(path)}.npy"


def _remove_stale(cache_dir: Path, path: Path, kind: str, keep: Path) -> None:
    """Delete older cache entries of ``path`` of this kind (a process still mapping one keeps its data)."""
    for stale in cache_dir.glob(f"{_cache_prefix(path, kind)}*.npy"):
        if stale != keep:
            remove(stale)


def check_cache(paths: list[Path], cache_dir: Path) -> list[str]:
    """Verify every cache entry of these volumes (decoded and derived); a damaged one is deleted (the
    next open rebuilds it). Returns a note per deleted entry."""
    notes = []
    for path in paths:
        pattern = f"{glob.escape(Path(path).stem)}-*{_path_hash(path)}-*.npy"  # every kind of entry
        for entry in sorted(Path(cache_dir).glob(pattern)):
            problem = entry_problem(entry, full=True)  # asked for: hash every entry
            if problem not in (None, "absent"):
                remove(entry)
                notes.append(f"{entry}: a damaged cache entry of {path} ({problem}); deleted, it is rebuilt when "
                             "the volume is next read.")
    return notes


# --------------------------------------------------------------------------- the integrity check


@dataclass
class DataSummary:
    """What ``vlab data check`` tabulates on success."""

    train: int = 0
    test: int = 0
    scrolls: Counter = field(default_factory=Counter)  # scroll_id -> training volumes
    shapes: Counter = field(default_factory=Counter)  # (D, H, W) -> volumes, train and test
    label_voxels: np.ndarray = field(default_factory=lambda: np.zeros(3, np.int64))  # of values 0, 1, 2

    @property
    def label_fractions(self) -> tuple[float, ...]:
        total = int(self.label_voxels.sum())
        return tuple(float(v) / total if total else 0.0 for v in self.label_voxels)


@dataclass
class CheckReport:
    root: Path
    problems: list[str]
    summary: DataSummary
    notes: list[str] = field(default_factory=list)  # e.g. damaged cache entries, deleted

    @property
    def ok(self) -> bool:
        return not self.problems


def check_dataset(root: Path, *, progress: bool = True, cache_dir: Path | None = None) -> CheckReport:
    """Every problem of a data root at once, each naming its file and what to do, and a summary;
    with ``cache_dir``, the decoded-volume cache entries of its volumes are verified too."""
    root = Path(root)
    summary = DataSummary()
    if not root.is_dir():
        return CheckReport(root, [f"{root}: data folder {absence(root, 'folder')}. Create a demo dataset with "
                                  "`vlab data synth "
                                  f"--out {root}` or pass the folder that holds train.csv."], summary)
    train, problems = read_index(root / "train.csv")
    test, test_problems = read_index(root / "test.csv", require_scroll=False)
    problems += test_problems
    for volume_id in sorted(set(train) & set(test)):
        problems.append(f"{root / 'test.csv'}: id {volume_id} is also in train.csv. An id names one volume; "
                        "remove it from one of the files.")
    images = _listing(root / "train_images", train, "train.csv", problems)
    labels = _listing(root / "train_labels", train, "train.csv", problems)
    tests = _listing(root / "test_images", test, "test.csv", problems)
    if (root / "test_images").is_dir() and not any((root / "test_images").glob(f"*{SUFFIX}")):
        problems.append(f"{root / 'test_images'}: no {SUFFIX} volumes. Put the test volumes there "
                        "(a submission needs at least one).")
    summary.scrolls.update(train.values())
    jobs = [(volume_id, images.get(volume_id), labels.get(volume_id)) for volume_id in train]
    jobs += [(volume_id, tests.get(volume_id), None) for volume_id in test]
    for volume_id, image_path, label_path in track(jobs, "checking volumes", progress):
        _check_volume(image_path, label_path, problems, summary)
        if volume_id in train:
            summary.train += 1
        else:
            summary.test += 1
    paths = [p for _, image, label in jobs for p in (image, label) if p is not None and p.is_file()]
    notes = check_cache(paths, cache_dir) if cache_dir is not None else []
    return CheckReport(root, problems, summary, notes)


def _listing(folder: Path, index: dict[str, str], csv_name: str, problems: list[str]) -> dict[str, Path]:
    """The folder's volumes by id; report csv ids without a file and files without a csv id."""
    if not folder.is_dir():
        problems.append(f"{folder}: folder missing. Create it and put one <id>{SUFFIX} per row of {csv_name} in it.")
        return {}
    found = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in (".tif", ".tiff") and p.is_file()}
    for volume_id in index:
        if volume_id not in found:
            problems.append(f"{folder / (volume_id + SUFFIX)}: missing, but {csv_name} lists id {volume_id}. "
                            f"Add the file or delete the row.")
    for volume_id, path in found.items():
        if path.suffix != SUFFIX:
            problems.append(f"{path}: volumes must be named <id>{SUFFIX}. Rename it to {volume_id}{SUFFIX}.")
        elif volume_id not in index:
            problems.append(f"{path}: no row of {csv_name} has the id {volume_id}. Add a row for it or move the "
                            "file out of the folder.")
    return {volume_id: path for volume_id, path in found.items() if path.suffix == SUFFIX and volume_id in index}


def _check_volume(image_path: Path | None, label_path: Path | None, problems: list[str],
                  summary: DataSummary) -> None:
    image = _decoded(image_path, problems)
    if image is not None and image.ndim == 3:
        summary.shapes[image.shape] += 1
    label = _decoded(label_path, problems)
    if label is None or label.ndim != 3:
        return
    if image is not None and image.ndim == 3 and image.shape != label.shape:
        problems.append(f"{label_path}: shape {label.shape} differs from its image's {image.shape} "
                        f"({image_path}). A label must have its image's shape; re-export one of them.")
    if label.dtype != np.uint8:
        return
    counts = np.bincount(label.ravel(), minlength=256)
    bad = [value for value in np.flatnonzero(counts) if value not in LABEL_VALUES]
    if bad:
        shown = ", ".join(str(v) for v in bad[:8]) + (", ..." if len(bad) > 8 else "")
        problems.append(f"{label_path}: label values {shown} found; only 0 (background), 1 (surface) and 2 "
                        "(unlabeled) are allowed. Map the other values to one of these.")
    summary.label_voxels += counts[:3]


def _decoded(path: Path | None, problems: list[str]) -> np.ndarray | None:
    """The decoded array at ``path`` (None if undecodable); notes why it is not a 3D uint8 volume."""
    if path is None:
        return None
    try:
        volume = read_tiff(path)
    except VolumeError as exc:
        problems.append(str(exc))
        return None
    problems.extend(volume_problems(path, volume))
    return volume


def track(items: list, description: str, enabled: bool) -> Iterable:
    """``items``, with a transient progress bar on stderr when ``enabled``."""
    if not enabled:
        return items
    from rich.progress import track

    return track(items, description=description, transient=True, console=err)
