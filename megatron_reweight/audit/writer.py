"""Writing and reading the weight audit (the format: megatron_reweight.audit)."""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy

FILE_NAME = re.compile(r"^audit-(\d{9})-(\d{9})\.parquet$")
META_FILE = "meta.json"
TEMPORARY = ".tmp"


def _schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("iteration", pa.int64()),
            ("r", pa.float64()),
            ("window", pa.int32()),
            ("sample", pa.int64()),
            ("domain", pa.string()),
            ("dataset_id", pa.int32()),
            ("documents", pa.list_(pa.int64())),
            ("loss", pa.float32()),
            ("weight_x_b", pa.float32()),
        ]
    )


def _file_name(first: int, last: int) -> str:
    return f"audit-{first:09d}-{last:09d}.parquet"


def _write_atomically(path: Path, write) -> None:
    """`write(temporary_path)`, flushed to disk, then renamed to `path`: a reader sees the whole
    file or none of it."""
    temporary = path.with_name(path.name + TEMPORARY)
    write(temporary)
    with open(temporary, "rb") as file:
        os.fsync(file.fileno())
    os.replace(temporary, path)


def audit_files(directory: Path) -> list[tuple[int, int, Path]]:
    """(first iteration, last iteration, path) of every complete audit file, in order."""
    found = []
    for path in Path(directory).iterdir():
        match = FILE_NAME.match(path.name)
        if match:
            found.append((int(match[1]), int(match[2]), path))
    return sorted(found)


# ----------------------------------------------------------------------------- documents
class DocumentLookup:
    """The dataset and document ids of a training sample, from megatron-core's indices: a
    BlendedDataset's (dataset_index, dataset_sample_index), then the GPTDataset's shuffle,
    sample and document indices, as `GPTDataset._query_document_sample_shuffle_indices` reads
    them. `dataset` is the training dataset the sampler indexes (a BlendedDataset or one
    GPTDataset); `domain_of_dataset[i]` names dataset i's domain."""

    def __init__(self, dataset, domain_of_dataset: list[str]):
        self.datasets = dataset.datasets if hasattr(dataset, "dataset_index") else [dataset]
        self.blend = dataset if hasattr(dataset, "dataset_index") else None
        self.domain_of_dataset = domain_of_dataset
        for part in [dataset, *self.datasets]:  # megatron-core may map its index files on first read
            if getattr(part, "dataset_index", True) is None or getattr(part, "shuffle_index", True) is None:
                part[0]

    def __call__(self, samples: numpy.ndarray) -> tuple[numpy.ndarray, list[numpy.ndarray]]:
        """(dataset id per sample, document ids per sample) for the samples' positions."""
        if self.blend is not None:
            dataset_ids = numpy.asarray(self.blend.dataset_index[samples], dtype=numpy.int32)
            inner = numpy.asarray(self.blend.dataset_sample_index[samples], dtype=numpy.int64)
        else:
            dataset_ids, inner = numpy.zeros(len(samples), dtype=numpy.int32), samples
        documents: list[numpy.ndarray] = [None] * len(samples)
        for dataset_id in numpy.unique(dataset_ids):
            chosen = numpy.flatnonzero(dataset_ids == dataset_id)
            gpt = self.datasets[dataset_id]
            shuffled = gpt.shuffle_index[inner[chosen]]
            begins, ends = gpt.sample_index[shuffled, 0], gpt.sample_index[shuffled + 1, 0]
            for i, begin, end in zip(chosen, begins, ends):
                documents[i] = numpy.asarray(gpt.document_index[begin : end + 1], dtype=numpy.int64)
        return dataset_ids, documents


# ----------------------------------------------------------------------------- writing
@dataclass
class _Window:
    iteration: int
    r: float
    window: int
    first_sample: int
    losses: object  # [b] tensor, on the device until the flush
    weights: object  # [b] tensor, summing to 1


@dataclass
class AuditWriter:
    """Collects each step's weighting windows and appends them to DIR as Parquet, one file
    per `flush`. Create it on the one rank that writes (it holds every window's gathered
    losses and weights), with the iteration the run starts from: rows after it, left by a run
    that stopped later than its last checkpoint, are deleted first."""

    directory: Path
    start_iteration: int
    meta: dict
    lookup: DocumentLookup | None = None  # None: the sample's documents are not known
    pending: list[_Window] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        trim_audit(self.directory, self.start_iteration)
        meta = {**self.meta, "documents_recorded": self.lookup is not None}
        _write_atomically(self.directory / META_FILE, lambda path: path.write_text(json.dumps(meta, indent=1) + "\n"))

    def add_step(self, iteration: int, r: float, first_sample: int, windows: list[tuple]) -> None:
        """The step's weighting windows, (losses, weights) each, in the sampler's order starting
        at sample position `first_sample`."""
        for index, (losses, weights) in enumerate(windows):
            self.pending.append(_Window(iteration, r, index, first_sample, losses, weights))
            first_sample += losses.numel()

    def flush(self) -> None:
        if not self.pending:
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        windows, self.pending = self.pending, []
        sizes = [w.losses.numel() for w in windows]
        repeat = lambda values, dtype: numpy.repeat(numpy.asarray(values, dtype=dtype), sizes)  # noqa: E731
        samples = numpy.concatenate([numpy.arange(w.first_sample, w.first_sample + n) for w, n in zip(windows, sizes)])
        losses = numpy.concatenate([w.losses.detach().float().cpu().numpy() for w in windows])
        weights_x_b = numpy.concatenate([(w.weights.detach().float() * n).cpu().numpy() for w, n in zip(windows, sizes)])
        columns = {
            "iteration": repeat([w.iteration for w in windows], numpy.int64),
            "r": repeat([w.r for w in windows], numpy.float64),
            "window": repeat([w.window for w in windows], numpy.int32),
            "sample": samples,
            "domain": None,
            "dataset_id": None,
            "documents": None,
            "loss": losses,
            "weight_x_b": weights_x_b,
        }
        if self.lookup is not None:
            dataset_ids, documents = self.lookup(samples)
            columns["dataset_id"], columns["documents"] = dataset_ids, documents
            columns["domain"] = numpy.asarray(self.lookup.domain_of_dataset, dtype=object)[dataset_ids]
        schema = _schema()
        table = pa.Table.from_arrays(
            [pa.nulls(len(samples), f.type) if columns[f.name] is None else pa.array(columns[f.name], f.type) for f in schema],
            schema=schema,
        )
        path = self.directory / _file_name(windows[0].iteration, windows[-1].iteration)
        _write_atomically(path, lambda temporary: pq.write_table(table, temporary))


def trim_audit(directory: Path, iteration: int) -> None:
    """Delete torn (temporary) files and every row after `iteration`."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    for path in Path(directory).glob(f"*{TEMPORARY}"):
        path.unlink()
    for first, last, path in audit_files(directory):
        if first > iteration:
            path.unlink()
        elif last > iteration:
            table = pq.read_table(path)
            kept = table.filter(pc.less_equal(table["iteration"], iteration))
            _write_atomically(directory / _file_name(first, iteration), lambda temporary: pq.write_table(kept, temporary))
            path.unlink()


# ----------------------------------------------------------------------------- reading
def read_audit(directory: Path):
    """(meta, table): the audit's run description and all its rows, as one pyarrow Table in
    iteration order. A file that cannot be read is passed over with a warning."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = Path(directory)
    meta_file = directory / META_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{directory}: no {META_FILE}; not a weight audit (--reweight-audit-dir)")
    meta = json.loads(meta_file.read_text())
    tables = []
    for _, _, path in audit_files(directory):
        try:
            tables.append(pq.read_table(path, schema=_schema()))
        except (OSError, pa.ArrowInvalid) as error:
            warnings.warn(f"{path}: unreadable, passed over ({error})", stacklevel=2)
    table = pa.concat_tables(tables) if tables else _schema().empty_table()
    return meta, table
