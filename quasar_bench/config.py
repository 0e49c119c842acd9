"""The config tree (conf/) as the one home of defaults: conf/<group>/<name>.yaml holds every
default of that entry, and code reads settings without defaults of its own."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .errors import unknown

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


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
        return OmegaConf.merge(OmegaConf.load(path), entry)
    if entry.get("module") or not require_yaml:
        return entry
    raise unknown(group, name, choices(group))
