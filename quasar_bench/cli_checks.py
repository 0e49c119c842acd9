"""Checks of the command line before Hydra runs anything (nothing written).

Hydra reports an unknown key (`foo=1`, `model.nope=1`) as a multi-line message; here the same
overrides are composed first (sweep values: their first choice) and any problem becomes one line.
Also: overrides that contradict each other, an out_dir that cannot be written, and a model hub
that cannot be reached (then HF_HUB_OFFLINE=1 is set, so a hub id fails at once instead of
after minutes of network retries, and models already in the local HF cache still load).
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from .errors import QuasarError

# Hydra flags that change what the command does (help, print config, ...): skip the checks.
_SKIP_FLAGS = ("--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--info", "-i",
               "--shell-completion", "-sc", "--config-path", "-cp", "--config-name", "-cn",
               "--config-dir", "-cd", "--package", "-p", "--resolve", "--experimental-rerun")


def _first_values(args: list[str]):
    """Parsed overrides, each sweep replaced by its first value: one job's command line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides=args)
    lines = []
    for o in parsed:
        if o.is_sweep_override():
            first = next(iter(o.sweep_string_iterator()))
            lines.append(f"{o.get_key_element()}={first}")
        else:
            lines.append(o.input_line)
    return parsed, lines


def compose_first_job(args: list[str], conf_dir: Path):
    """The composed config of the first job, and the parsed overrides; raises QuasarError."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException, OverrideParseException

    args = [a for a in args if not a.startswith("hydra") and not a.startswith(("+hydra", "~hydra", "++hydra"))]
    try:
        parsed, lines = _first_values(args)
    except OverrideParseException as e:
        raise QuasarError(f"cannot parse the overrides: {str(e).splitlines()[0]}") from None
    except Exception:  # noqa: BLE001 (a sweep form this check does not expand: Hydra judges it)
        return None, None
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose(config_name="config", overrides=lines, return_hydra_config=True)
    except ConfigCompositionException as e:
        text = f"{e} {e.__cause__ or ''}"
        for o in parsed:
            if f"Could not override '{o.key_or_group}'" in text or f"Key '{o.key_or_group}' is not in struct" in text:
                key = o.key_or_group
                raise QuasarError(f"unknown config key {key!r}: check its spelling (python -m quasar_bench "
                                  f"--cfg job lists the keys), or add a new key with +{key}=...") from None
        raise QuasarError(f"bad override: {str(e).splitlines()[0]}") from None
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)  # so ${hydra:...} (experiment_name, out_dir) resolves
    return cfg, parsed


def _drafter_entries(cfg) -> list:
    if cfg.get("drafter") is not None:
        return [cfg.drafter]
    return list(cfg.matrix.drafters)


def _any_drafts(entries) -> bool:
    """Whether any of these drafter entries drafts tokens (its class says so; unknown: assume yes)."""
    from .config import entry_config
    from .drafters import drafter_class

    for e in entries:
        try:
            if drafter_class(entry_config("drafter", e)).drafts:
                return True
        except QuasarError:
            return True  # an unknown drafter: the run reports it
    return False


def check_conflicts(cfg, parsed) -> None:
    keys = {o.key_or_group for o in parsed}
    for group, listed in (("drafter", "matrix.drafters"), ("verifier", "matrix.verifiers")):
        if group in keys and any(k == listed or k.startswith(listed + ".") for k in keys):
            raise QuasarError(f"{group}= and {listed}= both choose the {group}s: give one of them "
                              f"({group}=NAME runs one {group}, {listed}=[a,b] a list)")
    sweeps = {o.key_or_group: o for o in parsed if o.is_sweep_override()}
    if "experiment" in sweeps or any(k.startswith("matrix.drafters") for k in sweeps):
        return  # the drafters differ between jobs: the runner judges each job
    entries = list(sweeps["drafter"].sweep_string_iterator()) if "drafter" in sweeps else _drafter_entries(cfg)
    if "k" in keys and cfg.get("k") is not None and not _any_drafts(entries):
        raise QuasarError(f"k={cfg.k} has no effect: no drafter of this run drafts tokens (plain autoregressive "
                          "only); drop k= or add a drafter, e.g. drafter=ngram")


def check_out_dir(cfg) -> None:
    """The first existing ancestor of out_dir must be a writable directory (nothing is created)."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        out = cfg.out_dir
    except (OmegaConfBaseException, ValueError, KeyError):
        return  # an out_dir that only resolves inside a job: the store checks it
    if out is None:
        raise QuasarError("out_dir=null: name a results directory, e.g. out_dir=runs/mine")
    path = Path(os.path.expanduser(str(out)))
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        why = "is not a directory" if not probe.is_dir() else "is not writable"
        raise QuasarError(f"cannot write results to {path} ({probe} {why}); pick a writable out_dir=")


def hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def needs_hub(model) -> bool:
    if model is None or model.get("weights", "pretrained") == "random":
        return False
    from .config import is_local_path

    path = model.get("path")
    return isinstance(path, str) and path != "???" and not is_local_path(path)


def check_hub(cfg) -> None:
    """Offline and a hub id to load: set HF_HUB_OFFLINE=1 before transformers is imported, so the
    load fails at once (one line naming model.path=) instead of retrying for about a minute."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return
    if os.environ.get("QUASAR_OFFLINE", "0") not in ("", "0"):
        os.environ["HF_HUB_OFFLINE"] = "1"
        return
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # a direct probe says nothing about a proxied connection
    try:
        model = cfg.get("model")
        if not needs_hub(model):
            return
    except Exception:  # noqa: BLE001 (unresolvable path: the loader reports it)
        return
    if not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"


def precheck(args: list[str], conf_dir: Path) -> None:
    """Raise QuasarError (one line) for bad overrides; run only for plain runs and -m sweeps."""
    if any(a.split("=", 1)[0] in _SKIP_FLAGS for a in args if a.startswith("-")):
        return
    args = [a for a in args if a not in ("-m", "--multirun")]
    cfg, parsed = compose_first_job(args, conf_dir)
    if cfg is None:
        return
    check_conflicts(cfg, parsed)
    from omegaconf.errors import OmegaConfBaseException

    from .plan import validate

    try:
        validate(cfg)
    except OmegaConfBaseException:
        pass  # a value that only resolves inside a job: the run validates it again there
    check_out_dir(cfg)
    check_hub(cfg)
