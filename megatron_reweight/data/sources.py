"""Input documents: a Hugging Face dataset streamed by name, or local parquet / jsonl files.

Both go through `datasets.load_dataset(..., streaming=True)`, so nothing needs the whole corpus
on disk and local files exercise the same code as hub datasets. The unit of work is one data file
(a hub dataset's parquet/jsonl files, or each local file): files are read independently, by
different processes, and each in order.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets

from megatron_reweight.data.errors import DataPrepError

# `datasets` logs a json read error before raising it; the raised error is reported (`cannot read FILE: ...`).
logging.getLogger("datasets.packaged_modules.json.json").addFilter(
    lambda record: not record.getMessage().startswith("Failed to load JSON from file")
)

# Local file suffix -> the `datasets` builder that reads it; compressed variants end in these too.
_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


@dataclass
class InputConfig:
    """Where documents come from. Exactly one of `dataset` (hub) and `files` (local) is set."""

    dataset: str | None = None  # Hugging Face dataset name, e.g. "HuggingFaceFW/fineweb"
    dataset_config: str | None = None  # its configuration, e.g. "sample-350BT"
    split: str = "train"
    files: list[str] = field(default_factory=list)  # local parquet / jsonl files or glob patterns
    text_field: str = "text"  # dotted path for nested fields
    domain_field: str | None = None  # split into one dataset per value, e.g. "meta.redpajama_set_name"


@dataclass
class Document:
    text: str  # "" for a row with empty or null text
    domain: str | None  # None when the input is not split by domain (or the text is empty)
    row: int  # row number in its data file


class DocumentSource:
    """The documents of one `InputConfig`, checked up front so bad input fails before any output."""

    def __init__(self, config: InputConfig):
        self.config = config
        if (config.dataset is None) == (not config.files):
            raise DataPrepError("give either a Hugging Face dataset name or local input files (not both, not neither)")
        self.files = expand_input_files(config.files) if config.files else []
        self.dataset = self._select_fields(self._open())

    def _open(self) -> datasets.IterableDataset:
        config = self.config
        if self.files:
            load_args = dict(path=input_builder(self.files), data_files=self.files, split="train")
            description = f"the input files ({', '.join(self.files)})"
        else:
            load_args = dict(path=config.dataset, name=config.dataset_config, split=config.split)
            description = f"dataset {config.dataset!r} (config {config.dataset_config!r}, split {config.split!r})"
        try:
            return datasets.load_dataset(**load_args, streaming=True)
        except Exception as error:  # datasets raises many types: missing repo, config, split, bad files
            raise _read_error(description, error) from error

    def _select_fields(self, dataset: datasets.IterableDataset) -> datasets.IterableDataset:
        """Check that the text (and domain) fields exist, and read only those columns."""
        columns = dataset.column_names  # None when the dataset does not declare its features
        if columns is None:
            return dataset
        needed = {option: path.split(".")[0] for option, path in self._field_paths().items()}
        for option, column in needed.items():
            if column not in columns:
                found = ", ".join(columns) if columns else "none; is the input empty?"
                raise DataPrepError(f"the input has no field {column!r} (fields: {found}); pass the right --{option}")
        return dataset.select_columns(sorted(set(needed.values())))

    def _field_paths(self) -> dict[str, str]:
        paths = {"text-field": self.config.text_field}
        if self.config.domain_field:
            paths["domain-field"] = self.config.domain_field
        return paths

    @property
    def num_files(self) -> int:
        return self.dataset.n_shards

    def describe_file(self, index: int) -> str:
        return self.files[index] if self.files else f"data file {index} of {self.config.dataset!r}"

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this input, for refusing to resume a run over different input."""
        described = {key: value for key, value in asdict(self.config).items() if key != "files"}
        if self.files:
            described["files"] = [{"path": path, "bytes": os.path.getsize(path)} for path in self.files]
        return described

    def documents(self, file_index: int) -> Iterator[Document]:
        """Every row of one data file, in order."""
        rows = self.dataset.shard(num_shards=self.num_files, index=file_index)
        for row_index, row in enumerate(self._rows(rows, file_index)):
            try:
                text = _text_of(row, self.config.text_field)
                domain = _domain_of(row, self.config.domain_field) if text and self.config.domain_field else None
            except DataPrepError as error:
                raise DataPrepError(f"{self.describe_file(file_index)}, row {row_index}: {error}") from None
            yield Document(text, domain, row_index)

    def _rows(self, rows: datasets.IterableDataset, file_index: int) -> Iterator[dict]:
        """The rows of one data file; read errors name the file and, for bad bytes, the fix."""
        iterator = iter(rows)
        while True:
            try:
                yield next(iterator)
            except StopIteration:
                return
            except Exception as error:  # pyarrow / json / fsspec errors of all kinds
                raise _read_error(self.describe_file(file_index), error) from error


def _read_error(what: str, error: Exception) -> DataPrepError:
    hint = ""
    if isinstance(error, UnicodeDecodeError):
        hint = "; the text is not UTF-8: re-encode it, e.g. `iconv -f latin1 -t utf-8`"
    return DataPrepError(f"cannot read {what}: {type(error).__name__}: {error}{hint}")


def expand_input_files(patterns: list[str]) -> list[str]:
    """Absolute paths of the input files, in the given order (glob matches sorted), checked readable."""
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern))) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise DataPrepError(f"input pattern {pattern!r} matches no files")
        files.extend(str(Path(match).expanduser().resolve()) for match in matches)
    for path in files:
        if not os.path.isfile(path):
            raise DataPrepError(f"input file {path} does not exist")
        if os.path.getsize(path) == 0:
            raise DataPrepError(f"input file {path} is empty (0 bytes); remove it from the inputs")
        if input_builder([path]) == "parquet" and _parquet_rows(path) == 0:
            raise DataPrepError(f"input file {path} has no rows; remove it from the inputs")
    return files


def input_builder(files: list[str]) -> str:
    """The `datasets` builder ("parquet" or "json") that reads all of `files`."""
    builders = set()
    for path in files:
        name = path.lower()
        for compression in _COMPRESSIONS:
            name = name.removesuffix(compression)
        suffix = os.path.splitext(name)[1]
        if suffix not in _BUILDERS:
            raise DataPrepError(
                f"input file {path}: unknown format; use .parquet, .jsonl or .json (optionally compressed)"
            )
        builders.add(_BUILDERS[suffix])
    if len(builders) > 1:
        raise DataPrepError("input files mix parquet and json; prepare them in separate runs")
    return builders.pop()


def _parquet_rows(path: str) -> int:
    import pyarrow.parquet

    try:
        return pyarrow.parquet.ParquetFile(path).metadata.num_rows
    except Exception as error:  # pyarrow.ArrowInvalid and friends
        raise DataPrepError(f"input file {path} is not a readable parquet file: {error}") from error


def value_at(row: dict, path: str) -> Any:
    """The value at a dotted field path (`meta.redpajama_set_name`) of one row."""
    value = row
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            raise DataPrepError(f"no field {path!r}")
        value = value[key]
    return value


def _text_of(row: dict, path: str) -> str:
    text = value_at(row, path)
    if text is None or isinstance(text, str):
        return text or ""
    if isinstance(text, bytes):
        raise DataPrepError(f"field {path!r} holds bytes, not text; store it as a UTF-8 string column")
    raise DataPrepError(f"field {path!r} holds {type(text).__name__}, not text; pass the right --text-field")


def _domain_of(row: dict, path: str) -> str:
    value = value_at(row, path)
    if value is None or value == "":
        raise DataPrepError(f"the domain field {path!r} is empty")
    return domain_file_name(str(value))


def domain_file_name(value: str) -> str:
    """A domain value as a file-name-safe dataset name ("Stack Exchange" -> "Stack_Exchange")."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", value).strip("._") or "domain"
