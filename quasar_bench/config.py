"""The config tree (conf/) as the one home of defaults: conf/<group>/<name>.yaml holds every
default of that entry, and code reads settings without defaults of its own."""
from __future__ import annotations

import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .errors import QuasarError, unknown
from .schema import check_like_defaults

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


# A model hub id (huggingface_hub's own rule): `name` or `org/name`, word characters, '-' and '.'.
_HUB_ID = re.compile(r"^(\b[\w\-.]+\b/)?\b[\w\-.]{1,96}\b$")


def is_local_path(value: str) -> bool:
    """Whether a model / tokenizer source can only be a local path: it exists, or it cannot be a
    hub id (`/x`, `./x`, `~/x`, `a/b/c`). Such a value is never looked up on a hub."""
    return Path(os.path.expanduser(value)).exists() or not _HUB_ID.match(value) or "--" in value or ".." in value


def check_local_paths(model) -> None:
    """A model.path / model.tokenizer that can only be a local path must exist (before anything
    is loaded and before any network probe: a mistyped folder never becomes a hub request)."""
    for key, what in (("path", "a folder with config.json and weights"), ("tokenizer", "a tokenizer folder"),
                      ("reference_path", "the full-precision model's folder")):
        if model is None or key not in model or OmegaConf.is_missing(model, key):
            continue
        value = model[key]
        if isinstance(value, str) and is_local_path(value) and not Path(os.path.expanduser(value)).exists():
            raise QuasarError(f"model.{key}={value}: no such file or folder (a local path, not a hub id like org/name); "
                              f"pass model.{key}=<{what}> or a hub id")


def entry_config(group: str, entry, require_yaml: bool = True) -> DictConfig:
    """An entry is a config name (`ngram`) or a mapping with `name` plus overrides; the result is
    conf/<group>/<name>.yaml merged under the overrides. An entry with `module:` (a plug-in kept
    outside the package) may come without a YAML: the mapping is then its whole config."""
    if isinstance(entry, str):
        entry = {"name": entry}
    if isinstance(entry, DictConfig):
        entry = OmegaConf.to_container(entry, resolve=True)
    entry = OmegaConf.create(dict(entry))
    name = entry.get("name")
    path = CONF_DIR / group / f"{name}.yaml"
    if path.exists():
        defaults = OmegaConf.load(path)
        check_like_defaults(group, name, OmegaConf.to_container(defaults), OmegaConf.to_container(entry))
        return OmegaConf.merge(defaults, entry)
    if entry.get("module") or not require_yaml:
        return entry
    raise unknown(group, name, choices(group))
