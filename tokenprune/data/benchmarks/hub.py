"""Loading benchmark tables with Hugging Face ``datasets``, and the base class every benchmark shares.

A table comes from the hub (``load_dataset(name, config, split=...)``, trying each of ``hub_names`` in turn:
lmms-eval moved its copies in 2026, so the old name comes first, then the new one) or from a local copy
(``dataset.path``): a directory downloaded from the hub (``huggingface-cli download --repo-type dataset``), a
directory written by ``save_to_disk``, or one parquet / json / jsonl / csv / arrow file holding the split.
Splits, configs and columns are checked before any sample is built; every error names what is wrong.
"""

from __future__ import annotations

import functools
from abc import abstractmethod
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..base import Dataset, DatasetError, check_count, check_seed, check_stop, select_rows
from ..sample import Sample

FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}


# ---------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------
def load_split(owner: str, path: str | None, hub_names: list[str], config: str | None, split: str,
               revision: str | None = None, config_required: bool = False):
    """``(table, source)``: one split of a benchmark as a ``datasets.Dataset``, from ``path`` or the hub.

    A local directory without configs is taken as the config asked for, unless ``config_required``.
    """
    if path:
        return _load_local(owner, Path(path), config, split, config_required), str(path)
    if not hub_names:
        raise DatasetError(f"{owner}: give dataset.path (a local copy) or dataset.hub_names")
    return _load_hub(owner, list(hub_names), config, split, revision)


def is_saved(directory: Path) -> bool:
    return (directory / "dataset_dict.json").is_file() or (directory / "state.json").is_file()


def _load_local(owner: str, path: Path, config: str | None, split: str, config_required: bool):
    import datasets

    if not path.exists():
        raise DatasetError(f"{owner}: dataset.path={str(path)!r} does not exist")
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DatasetError(f"{owner}: dataset.path={str(path)!r} must be a directory or a file ending in "
                               f"{', '.join(FILE_BUILDERS)}")
        return datasets.load_dataset(builder, data_files=str(path), split="train")  # the file is the split
    if config and is_saved(path / config):  # save_to_disk of several configs, one directory each
        path = path / config
    if is_saved(path):
        saved = datasets.load_from_disk(str(path))
        if isinstance(saved, datasets.DatasetDict):
            if split not in saved:
                raise DatasetError(f"{owner}: dataset.split={split!r} is not in {path}; its splits are {sorted(saved)}")
            return saved[split]
        return saved  # a saved Dataset is the split itself
    # a hub snapshot: configs and splits come from its README (or from file names when it has none)
    cache_dir = _cache_dir(path)
    configs = _config_names(str(path), cache_dir)
    if config not in configs:
        if configs != ("default",) or config_required:
            raise DatasetError(f"{owner}: dataset.config={config!r} is not a config of {path}; its configs are "
                               f"{list(configs)}")
        config = None  # a plain directory of data files is the config itself
    builder = datasets.load_dataset_builder(str(path), config, cache_dir=cache_dir)
    splits = list(builder.config.data_files or {})
    if split not in splits:
        raise DatasetError(f"{owner}: dataset.split={split!r} is not a split of {path}"
                           f"{f' (config {config})' if config else ''}; its splits are {splits}")
    builder.download_and_prepare()
    return builder.as_dataset(split=split)


def local_configs(path: Path) -> tuple[str, ...]:
    """The configs a downloaded hub repository declares (its README); () for a file or a save_to_disk copy."""
    if not path.is_dir() or is_saved(path):
        return ()
    return _config_names(str(path), _cache_dir(path))


@functools.lru_cache(maxsize=32)
def _config_names(path: str, cache_key: str) -> tuple[str, ...]:
    """The configs of a local copy (``cache_key`` changes with its files), read once for MVBench's 20 tasks."""
    import datasets

    return tuple(datasets.get_dataset_config_names(path))


def _cache_dir(path: Path) -> str:
    """A ``datasets`` cache directory for one state of a local copy.

    ``datasets`` keys the cache of a directory whose README declares its configs by the directory's name and
    the file patterns only, so a copy edited in place, or another copy with the same name, would load the
    stale cached table. The key here also covers the resolved path and every data file's size and mtime.
    """
    import datasets

    digest = hashlib.sha256(str(path.resolve()).encode())
    for file in sorted(path.rglob("*")):
        hidden = any(part.startswith(".") for part in file.relative_to(path).parts)
        if file.suffix.lower() in (*FILE_BUILDERS, ".md") and not hidden and file.is_file():
            stat = file.stat()
            digest.update(f"{file.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return str(Path(datasets.config.HF_DATASETS_CACHE) / "tokenprune_local_copies" / digest.hexdigest()[:16])


def _load_hub(owner: str, hub_names: list[str], config: str | None, split: str, revision: str | None):
    import datasets

    failures = []
    for name in hub_names:
        try:
            splits = datasets.get_dataset_split_names(name, config, revision=revision)
        except FileNotFoundError as error:  # not on the hub under this name (or gated)
            failures.append(f"{name}: {error}")
            continue
        except ConnectionError:
            splits = None  # offline: a copy in the datasets cache may still load
        except ValueError as error:  # an unknown config
            raise DatasetError(f"{owner}: dataset.config={config!r} does not fit {name}: {error}") from error
        if splits is not None and split not in splits:
            raise DatasetError(f"{owner}: dataset.split={split!r} is not a split of {name}"
                               f"{f' (config {config})' if config else ''}; its splits are {splits}")
        try:
            return datasets.load_dataset(name, config, split=split, revision=revision), name
        except (FileNotFoundError, ConnectionError) as error:
            failures.append(f"{name}: {error}")
    raise DatasetError(f"{owner}: could not load {' or '.join(hub_names)} from the Hugging Face hub "
                       f"({'; '.join(failures)}). Download it and set dataset.path to the local copy.")


def prepare(owner: str, table, source: str, columns: tuple[str, ...], image_columns: tuple[str, ...] = ()):
    """``table`` with its required ``columns`` checked and its image columns left undecoded (bytes and path)."""
    import datasets

    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DatasetError(f"{owner}: {source} lacks the column(s) {missing}; it has {table.column_names}, "
                           f"{owner} needs {list(columns)}")
    for column in image_columns:
        if column in table.column_names and isinstance(table.features[column], datasets.Image):
            table = table.cast_column(column, datasets.Image(decode=False))
    return table


# ---------------------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------------------
def image_input(value):
    """What ``datasets`` stores for an image (``Image(decode=False)``: ``{"bytes", "path"}``) as an adapter
    input: the encoded bytes, or the file path; None when the row has no image. Decoding waits for
    ``vlm.prepare``, so a corrupt image is an error of that one sample."""
    if value is None:
        return None
    if isinstance(value, dict):
        if value.get("bytes"):
            return {"bytes": value["bytes"]}
        return value.get("path")
    return value  # already a PIL image or a path


def strip_letter(option: str) -> str:
    """An option's text without its letter prefix: "B. a red car" -> "a red car"."""
    return re.sub(r"^\s*\(?[A-Z][.):]\s*", "", str(option)).strip()


def find_video(video_dir: str, names: list[str]) -> str:
    """The first of ``video_dir / name`` that exists, else the first candidate (the adapter then reports the
    missing file as an error of that sample)."""
    candidates = [Path(video_dir) / name for name in names]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    return str(candidates[0])


# ---------------------------------------------------------------------------------------------------------
# Base classes
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Benchmark(Dataset):
    """A benchmark table: where it comes from (fields) and how a row becomes a sample (``build``).

    Subclasses set ``columns`` (required), ``id_column`` (None: the row number), ``image_columns``, ``download``
    (what the user must fetch, for errors and the README) and ``generation_source`` (the lmms-eval task file their
    ``max_new_tokens`` / ``stop`` defaults come from), override field defaults (hub names, split, generation
    settings, ...), add a ``config`` field when the hub dataset has several, and implement ``make_scorer`` and
    ``build(row, sample_id)``. Decoding is always greedy, as every lmms-eval task default is.
    """

    path: str | None = None  # local copy: hub snapshot directory, save_to_disk directory, or one data file
    hub_names: list[str] = field(default_factory=list)  # tried in order when path is null
    split: str = "test"
    limit: int | None = None  # at most this many samples
    seed: int | None = 0  # which samples under limit: a seeded random subset, or the first ones when null
    max_new_tokens: int = 16  # lmms-eval's task default (generation_kwargs.max_new_tokens); see generation_source
    stop: list[str] = field(default_factory=list)  # stop strings (lmms-eval's generation_kwargs.until)

    columns = ()
    id_column = None  # None: the row number
    image_columns = ("image",)
    download = ""
    generation_source = ""  # the lmms-eval task file whose generation_kwargs give max_new_tokens and stop
    generation_note = ""  # where a value does not come from that file

    def __post_init__(self):
        check_count(self.name, "limit", self.limit)
        check_count(self.name, "max_new_tokens", self.max_new_tokens, allow_none=False, minimum=1)
        self.stop = check_stop(self.name, self.stop)
        check_seed(self.name, self.seed)
        self.hub_names = list(self.hub_names)
        self.check()
        self.scorer = self.make_scorer()
        self._table = self.load()
        self._rows = select_rows(self.name, len(self._table), self.limit, self.seed, self.groups(self._table))
        self._ids = self.ids(self._table, self._rows)

    # -- what subclasses provide ------------------------------------------------------------------------
    def check(self) -> None:
        """Checks of the configuration that need no data (run before loading anything)."""

    @abstractmethod
    def make_scorer(self):
        """The benchmark's official scorer."""

    @abstractmethod
    def build(self, row: dict, sample_id: str) -> Sample:
        """One table row as a sample."""

    def groups(self, table) -> list | None:
        """One key per row for rows that ``limit`` must keep together (None: every row alone)."""
        return None

    # -- loading ----------------------------------------------------------------------------------------
    def load(self):
        """The table, columns checked, image columns left undecoded."""
        table, source = load_split(self.name, self.path, self.hub_names, getattr(self, "config", None), self.split)
        return prepare(self.name, table, source, tuple(self.columns), tuple(self.image_columns))

    def ids(self, table, rows: list[int]) -> list[str]:
        if self.id_column is None:
            return [str(row) for row in rows]
        values = list(table[self.id_column])
        return [str(values[row]) for row in rows]

    # -- Dataset ----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < len(self._rows):
            raise IndexError(index)
        return self.build(self._table[self._rows[index]], self._ids[index])

    def sample_id(self, index: int) -> str:
        return self._ids[index]


@dataclass
class VideoBenchmark(Benchmark):
    """A benchmark whose rows name video files in ``video_dir`` (unpacked from the benchmark's archives)."""

    video_dir: str | None = None

    image_columns = ()

    def check(self) -> None:
        if not self.video_dir:
            raise DatasetError(f"{self.name} needs dataset.video_dir: the directory of its unpacked videos "
                               f"({self.download})")
        if not Path(self.video_dir).is_dir():
            raise DatasetError(f"{self.name}: dataset.video_dir={self.video_dir!r} is not a directory")
