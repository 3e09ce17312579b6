"""The domain of each dataset prefix of a Megatron `--data-path`.

Data preparation writes one indexed dataset per domain and input data file (`web_00000`,
`web_00001`, `code_00000`, ...) and records in the output folder's summary.json which domain each
one belongs to. So a domain is the input's domain whatever the sharding: the prefixes that a
summary.json lists under one domain are that domain. A prefix that no summary.json lists (data
made by another tool) is a domain of its own, named by its basename.
"""

from __future__ import annotations

import json
import os

SUMMARY_FILE = "summary.json"  # written by data preparation, last, into its output folder


def prefix_domains(prefixes: list[str]) -> list[str]:
    """The domain name of each prefix, in order; the shards of one prepared domain share a name.
    Different domains with the same name (two output folders, or the same basename given twice)
    get a numeric suffix: `web`, `web_2`."""
    recorded: dict[str, dict[str, str]] = {}  # folder -> {dataset basename: its domain}
    names: list[str] = []
    name_of: dict[tuple, str] = {}  # a domain's identity -> its unique name
    for position, prefix in enumerate(prefixes):
        folder, basename = os.path.split(os.path.abspath(prefix.rstrip("/")))
        if folder not in recorded:
            recorded[folder] = _recorded_domains(os.path.join(folder, SUMMARY_FILE))
        domain = recorded[folder].get(basename)
        identity = (folder, domain) if domain else (position,)
        if identity not in name_of:
            name = domain or basename or prefix
            candidate, n = name, 1
            while candidate in name_of.values():
                n += 1
                candidate = f"{name}_{n}"
            name_of[identity] = candidate
        names.append(name_of[identity])
    return names


def _recorded_domains(summary_file: str) -> dict[str, str]:
    """{dataset basename: domain} from a data-preparation summary.json; empty when there is none."""
    try:
        with open(summary_file) as file:
            domains = json.load(file)["domains"]
        return {entry["prefix"]: name for name, domain in domains.items() for entry in domain["files"]}
    except (OSError, ValueError, KeyError, TypeError):  # no summary, or a file of another tool
        return {}
