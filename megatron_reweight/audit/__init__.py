"""The weight audit: which samples, documents and domains the reweighting pushes down or up.

`--reweight-audit-dir DIR` (pretrain_llama.py and the Megatron-LM drop-in) writes one row per
sample of every weighting window (`writer.AuditWriter`); `megatron-reweight-audit DIR` reads
them back (`report`). DIR holds:

    meta.json                        the run: strategy, window, domains, the blend's prefixes,
                                     whether document ids are recorded (and if not, why)
    audit-000000001-000000050.parquet  the rows of iterations 1..50, one file per flush

Columns: `iteration` (1-based, as logged), `r`, `window` (the weighting window's index within
the step), `sample` (the sample's position in the training order: the consumed samples before
it), `domain`, `dataset_id` (index into meta.json's prefixes), `documents` (the ids, within that
dataset's indexed files, of the documents the sample's tokens come from: a sample may span
several), `loss` (the sample's mean token loss) and `weight_x_b` (its weight x the window's
size b: 1 is uniform).

A file is written under a temporary name and renamed when complete, so a write torn by a kill
leaves only a temporary file, which readers pass over and the next run deletes. A resumed run
deletes the rows after the iteration it resumes from before it appends: no row is there twice.
"""

from megatron_reweight.audit.writer import AuditWriter, DocumentLookup, read_audit

__all__ = ["AuditWriter", "DocumentLookup", "read_audit"]
