"""Vocabulary files and lookups.

A vocabulary file ``DATA_DIR/vocab/<name>.txt`` holds one raw value per line; line ``i``
maps to index ``i + schema.NUM_RESERVED_IDS``. Index ``schema.PAD_ID`` means padding or a
missing value, ``schema.OOV_ID`` a value the vocabulary does not know.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from tfrs_ctx import schema


def vocab_path(data_dir: str, name: str) -> str:
    """Where vocabulary ``name`` lives under a data directory."""
    return os.path.join(data_dir, schema.VOCAB_DIR, schema.vocab_filename(name))


def vocab_text(values: Iterable[Any]) -> str:
    """The file content of a vocabulary: one raw value per line."""
    lines = []
    for value in values:
        text = str(value)
        if text == schema.MISSING_STRING or "\n" in text or "\r" in text:
            raise ValueError(f"vocabulary value {text!r} is empty or spans lines")
        lines.append(text)
    if len(set(lines)) != len(lines):
        raise ValueError("vocabulary values must be unique")
    return "".join(line + "\n" for line in lines)


def write_vocab(data_dir: str, name: str, values: Iterable[Any]) -> str:
    """Write vocabulary ``name`` atomically; returns its path."""
    path = vocab_path(data_dir, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(vocab_text(values))
    os.replace(tmp, path)
    return path


def parse_vocab(text: str) -> list[str]:
    """The values of a vocabulary file's content, in index order."""
    return text.splitlines()


def load_vocab(data_dir: str, name: str) -> list[str]:
    """The raw values of vocabulary ``name`` (strings, as written), in index order."""
    with open(vocab_path(data_dir, name), encoding="utf-8") as f:
        return parse_vocab(f.read())


def vocab_sizes(data_dir: str) -> dict[str, int]:
    """Embedding rows (reserved ids included) of every schema vocabulary."""
    return {name: schema.vocab_size(len(load_vocab(data_dir, name))) for name in schema.VOCABULARIES}


def is_missing(value: Any) -> bool:
    """``None``, NaN and the empty string all mean "missing" (index ``PAD_ID``)."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value == schema.MISSING_STRING


class Vocabulary:
    """Maps raw values to indices: missing -> ``PAD_ID``, unknown -> ``OOV_ID``.

    Values are compared by their string form, so ``Vocabulary(["7"]).index(7) == 2``.
    """

    def __init__(self, values: Sequence[Any]):
        self.values: list[str] = [str(v) for v in values]
        self._index = {v: i + schema.NUM_RESERVED_IDS for i, v in enumerate(self.values)}
        if len(self._index) != len(self.values):
            raise ValueError("vocabulary values must be unique")
        self._int_keys: np.ndarray | None = None
        self._int_order: np.ndarray | None = None

    @classmethod
    def load(cls, data_dir: str, name: str) -> Vocabulary:
        return cls(load_vocab(data_dir, name))

    def __len__(self) -> int:
        return len(self.values)

    def __getstate__(self) -> dict:
        return {"values": self.values}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["values"])

    @property
    def size(self) -> int:
        """Embedding rows needed, reserved ids included."""
        return schema.vocab_size(len(self.values))

    def index(self, value: Any) -> int:
        """The index of one raw value."""
        if is_missing(value):
            return schema.PAD_ID
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return self._index.get(str(value), schema.OOV_ID)

    def indices(self, values: Iterable[Any]) -> np.ndarray:
        """Indices of many raw values (int64)."""
        return np.fromiter((self.index(v) for v in values), dtype=np.int64)

    def value(self, index: int) -> str | None:
        """The raw value at ``index`` (``None`` for the reserved ids)."""
        return self.values[index - schema.NUM_RESERVED_IDS] if index >= schema.NUM_RESERVED_IDS else None

    def int_indices(self, ids: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`index` for integer ids (integer vocabularies only)."""
        if self._int_keys is None:
            keys = np.asarray([int(v) for v in self.values], dtype=np.int64)
            self._int_order = np.argsort(keys, kind="stable")
            self._int_keys = keys[self._int_order]
        ids = np.asarray(ids, dtype=np.int64)
        if not len(self._int_keys):
            return np.full(ids.shape, schema.OOV_ID, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._int_keys, ids), len(self._int_keys) - 1)
        found = self._int_keys[pos] == ids
        return np.where(found, self._int_order[pos] + schema.NUM_RESERVED_IDS, schema.OOV_ID).astype(np.int64)


class IntVocabulary(Vocabulary):
    """A vocabulary of integer values held as one int64 array (ads, advertisers, categories at 10M).

    Same indices as :class:`Vocabulary` over the values' string forms, without a Python string
    and dict entry per value; :attr:`values` is built on demand.
    """

    def __init__(self, ids: Any):
        self.ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        self._int_order = np.argsort(self.ids, kind="stable")
        self._int_keys = self.ids[self._int_order]
        if len(self._int_keys) > 1 and bool((self._int_keys[1:] == self._int_keys[:-1]).any()):
            raise ValueError("vocabulary values must be unique")

    @property
    def values(self) -> list[str]:  # type: ignore[override]
        return [str(v) for v in self.ids.tolist()]

    def __len__(self) -> int:
        return len(self.ids)

    def __getstate__(self) -> dict:
        return {"ids": self.ids}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["ids"])

    @property
    def size(self) -> int:
        return schema.vocab_size(len(self.ids))

    def index(self, value: Any) -> int:
        if is_missing(value):
            return schema.PAD_ID
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            value = int(value)
        if isinstance(value, str) and _INT_TEXT.fullmatch(value) and str(int(value)) == value:
            value = int(value)
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            return schema.OOV_ID
        if not -(2**63) <= int(value) < 2**63:
            return schema.OOV_ID
        return int(self.int_indices(np.asarray([int(value)], dtype=np.int64))[0])

    def value(self, index: int) -> str | None:
        return str(int(self.ids[index - schema.NUM_RESERVED_IDS])) if index >= schema.NUM_RESERVED_IDS else None

    def text(self) -> str:
        """The vocabulary file's content (what :func:`vocab_text` gives for :attr:`values`)."""
        return "".join(f"{v}\n" for v in self.ids.tolist())


_INT_TEXT = re.compile(r"-?[0-9]+")


def file_text(vocab: Vocabulary) -> str:
    """The content of a vocabulary's file."""
    return vocab.text() if isinstance(vocab, IntVocabulary) else vocab_text(vocab.values)


def load_vocabularies(data_dir: str) -> dict[str, Vocabulary]:
    """Every schema vocabulary of a data directory, as lookups."""
    return {name: Vocabulary.load(data_dir, name) for name in schema.VOCABULARIES}
