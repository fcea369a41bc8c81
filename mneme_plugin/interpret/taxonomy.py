"""Category taxonomies: built-in data files and user files of the same schema.

Schema (YAML or JSON)::

    name: mmlu
    description: free text
    entries:
      - id: high_school_biology        # unique; for benchmarks, the lm-eval task suffix
        name: high school biology
        description: one line
        keywords: [cells, genes, dna]

Built-ins: the files in ``mneme_plugin/data/taxonomies`` (``builtin_taxonomies()``; ``mneme taxonomies``
lists them with their sizes), e.g. ``mmlu`` (57 subjects) and ``organism`` (the 8 domains of the CPU
model organism). A taxonomy is named in the mapping by its ``name`` key, so the taxonomies of one
mapping must have different names.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from mneme_plugin.config import load_yaml
from mneme_plugin.errors import ConfigError
from mneme_plugin.files import json_digest


@dataclass(frozen=True)
class TaxonomyEntry:
    id: str
    name: str
    description: str = ""
    keywords: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        return " ".join([self.name, self.description, *self.keywords])


@dataclass
class Taxonomy:
    name: str
    entries: list[TaxonomyEntry]
    description: str = ""
    source: str = ""
    by_id: dict[str, TaxonomyEntry] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.by_id = {e.id: e for e in self.entries}

    def ids(self) -> list[str]:
        return [e.id for e in self.entries]


def builtin_taxonomies() -> list[str]:
    folder = resources.files("mneme_plugin") / "data" / "taxonomies"
    return sorted(p.name.rsplit(".", 1)[0] for p in folder.iterdir() if p.name.endswith((".yaml", ".json")))


def _parse(data: Any, source: str) -> Taxonomy:
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list) or not data["entries"]:
        raise ConfigError(f"Taxonomy {source} must be a mapping with a non-empty 'entries' list.")
    entries, seen = [], set()
    for i, raw in enumerate(data["entries"]):
        if not isinstance(raw, dict) or not raw.get("id"):
            raise ConfigError(f"Taxonomy {source}: entry {i} needs an 'id'.")
        eid = str(raw["id"])
        if eid in seen:
            raise ConfigError(f"Taxonomy {source}: duplicate entry id {eid!r}.")
        seen.add(eid)
        unknown = sorted(set(raw) - {"id", "name", "description", "keywords"})
        if unknown:
            raise ConfigError(f"Taxonomy {source}: entry {eid!r} has unknown key(s) {unknown}.")
        keywords = raw.get("keywords") or []
        if isinstance(keywords, str):
            keywords = keywords.split()
        if not isinstance(keywords, list):
            raise ConfigError(f"Taxonomy {source}: entry {eid!r} has keywords {keywords!r}; give a list of words "
                              "(or one string of words separated by spaces).")
        entries.append(TaxonomyEntry(eid, str(raw.get("name") or eid.replace("_", " ")),
                                     str(raw.get("description") or ""), tuple(str(k) for k in keywords)))
    return Taxonomy(str(data.get("name") or Path(source).stem), entries, str(data.get("description") or ""), source)


def taxonomy_digest(taxonomy: Taxonomy) -> str:
    """SHA-256 (16 hex characters) of a taxonomy's entries: what a mapping made with it depends on."""
    from dataclasses import asdict

    return json_digest([asdict(e) for e in taxonomy.entries])


def load_taxonomy(spec: str | os.PathLike[str]) -> Taxonomy:
    """A built-in taxonomy by name, or a YAML / JSON file of the same schema."""
    path = Path(spec)
    if path.suffix.lower() in (".yaml", ".yml", ".json") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"Taxonomy file {path} does not exist.")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError(f"Taxonomy file {path} is not UTF-8 text ({err}); save it as UTF-8.") from err
        try:
            data = json.loads(text) if path.suffix.lower() == ".json" else load_yaml(text)
        except (json.JSONDecodeError, yaml.YAMLError) as err:
            raise ConfigError(f"Taxonomy file {path} is not valid: {err}") from err
        return _parse(data, str(path))
    name = str(spec)
    folder = resources.files("mneme_plugin") / "data" / "taxonomies"
    for ext in (".yaml", ".json"):
        res = folder / f"{name}{ext}"
        if res.is_file():
            text = res.read_text()
            return _parse(yaml.safe_load(text) if ext == ".yaml" else json.loads(text), name)
    raise ConfigError(f"Unknown taxonomy {name!r}: built-ins are {builtin_taxonomies()}, or pass a YAML/JSON file.")
