"""The type of every run setting, checked before anything is loaded: one line naming the setting,
the value given and the type it must have (`max_new_tokens=2.5 must be an integer >= 1`).

The schema holds types and ranges only; defaults stay in conf/ (the one home of defaults). It is
checked with pydantic in strict mode: Hydra's own structured configs (OmegaConf 2.3) have no
`true | false | auto` type and convert silently (`1` and `'yes'` to true, `'2'` to 2).

Drafter and verifier entries have no schema here (a drafter is one file and one YAML): a value
given for one of their settings must have the type of that setting's default in
conf/<group>/<name>.yaml (`check_like_defaults`).
"""
from __future__ import annotations

import typing
from typing import Annotated, Any, List, Literal, Optional, Union

import annotated_types as at
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, with_config
from typing_extensions import TypedDict, is_typeddict

from .errors import QuasarError

PositiveInt = Annotated[int, Field(ge=1)]
Switch = Union[bool, Literal["auto"]]  # on, off, or where it pays
Device = Union[Literal["auto", "cpu", "cuda", "mps"], Annotated[str, Field(pattern=r"^cuda:\d+$", description="cuda:N")]]
_STRICT = ConfigDict(strict=True, extra="allow")  # extra: +new keys and plug-in settings pass


@with_config(_STRICT)
class ModelSettings(TypedDict, total=False):
    name: str
    path: Optional[str]
    reference_path: Optional[str]
    weights: Literal["pretrained", "random"]
    tokenizer: Optional[str]
    shapes: str
    seed: int
    device: Device
    dtype: Literal["auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16"]
    runtime: Literal["auto", "native", "hf"]
    max_seq_len: PositiveInt
    cache_dir: Optional[str]
    chat: bool
    enable_thinking: bool


@with_config(_STRICT)
class DatasetSettings(TypedDict, total=False):
    name: str
    path: Optional[str]
    categories: Optional[Union[str, List[str]]]
    limit: Optional[PositiveInt]
    per_category: Optional[PositiveInt]
    seed: int


@with_config(_STRICT)
class RunSettings(TypedDict, total=False):
    model: ModelSettings
    dataset: DatasetSettings
    k: Optional[PositiveInt]
    batch_size: Union[PositiveInt, List[PositiveInt]]
    batch_packed: bool
    batch_pack_bucket: PositiveInt
    max_new_tokens: PositiveInt
    temperature: Annotated[float, Field(ge=0)]
    top_p: Annotated[float, Field(gt=0, le=1)]
    seed: int
    repeats: PositiveInt
    warmup: bool
    fidelity: Switch
    teacher_forced: Switch
    min_exact_match: Annotated[float, Field(ge=0, le=1)]
    tie_margin: Annotated[float, Field(ge=0, lt=0.5)]
    cuda_graphs: Switch
    fuse_projections: Switch
    compile_elementwise: Switch
    fused_attention: Switch
    progress: bool
    skip_unsupported: bool
    out_dir: str


_ADAPTER = TypeAdapter(RunSettings)
_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
_BOUNDS = ((at.Ge, "ge", ">="), (at.Gt, "gt", ">"), (at.Le, "le", "<="), (at.Lt, "lt", "<"))


def describe(tp) -> str:
    """What a type annotation accepts, in words: `an integer >= 1 or null`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        base, meta = args[0], args[1:]
        words = [describe(base)]
        for m in meta:
            for rule in getattr(m, "metadata", [m]):
                words += [f"{sym} {getattr(rule, attr)}" for cls, attr, sym in _BOUNDS if isinstance(rule, cls)]
            if getattr(m, "description", None):
                return f"a string like {m.description}"
        return " ".join(words[:1]) + (" " + " and ".join(words[1:]) if len(words) > 1 else "")
    if origin is Union:
        return " or ".join(describe(a) for a in args)
    if origin is Literal:
        return str(args[0]) if len(args) == 1 else "one of " + ", ".join(map(str, args))
    if origin in (list, List):
        return f"a list, each {describe(args[0])}" if args else "a list"
    if is_typeddict(tp):
        return "a mapping"
    return _NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def show(value) -> str:
    """A value as it is written on the command line (null, true), strings quoted."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return repr(value)


def _plain(cfg, hints: dict) -> dict:
    """The settings of `cfg` that the schema names, as plain values. A value that only resolves
    inside a Hydra job (${hydra:...}) or is still missing (???) is left to the code that reads it."""
    from omegaconf import DictConfig, ListConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    out = {}
    for key, tp in hints.items():
        try:
            if key not in cfg:
                continue
            value = cfg[key]
        except (OmegaConfBaseException, ValueError, KeyError):
            continue
        if isinstance(value, DictConfig) and is_typeddict(tp):
            value = _plain(value, typing.get_type_hints(tp, include_extras=True))
        elif isinstance(value, (DictConfig, ListConfig)):
            try:
                value = OmegaConf.to_container(value, resolve=True)
            except (OmegaConfBaseException, ValueError, KeyError):
                continue
        out[key] = value
    return out


def _setting(loc: tuple, data: dict):
    """(dotted key, value, annotation) of the setting an error location points into."""
    tp, value, path = RunSettings, data, []
    for part in loc:
        hints = typing.get_type_hints(tp, include_extras=True) if is_typeddict(tp) else {}
        if part not in hints:
            break
        tp, value, path = hints[part], value[part], path + [part]
    return ".".join(path), value, tp


def check_settings(cfg) -> None:
    """QuasarError (one line, the first bad setting) unless every setting has its schema's type."""
    data = _plain(cfg, typing.get_type_hints(RunSettings, include_extras=True))
    try:
        _ADAPTER.validate_python(data)
    except ValidationError as e:
        key, value, tp = _setting(e.errors()[0]["loc"], data)
        raise QuasarError(f"{key}={show(value)} must be {describe(tp)}") from None


def check_like_defaults(group: str, name: str, defaults, given, prefix: str = "") -> None:
    """A value given for a setting of a drafter / verifier entry must have the type of that
    setting's default in its YAML (an int for an int, a number for a float, true / false for a
    bool; mappings are checked key by key). Null defaults and strings are the entry's to check."""
    for key, value in given.items():
        default = defaults.get(key) if isinstance(defaults, dict) else None
        if isinstance(default, dict) and isinstance(value, dict):
            check_like_defaults(group, name, default, value, f"{prefix}{key}.")
            continue
        if value is None or not isinstance(default, (bool, int, float)) or (isinstance(value, str) and "${" in value):
            continue  # no default type to hold it to, or an interpolation its config resolves later
        tp: Any = type(default)
        try:
            TypeAdapter(tp).validate_python(value, strict=True)
        except ValidationError:
            raise QuasarError(f"{group}.{prefix}{key}={show(value)} must be {describe(tp)} ({group} {name}; its "
                              f"default is {show(default)})") from None
