"""`python -m quasar_bench experiment=NAME [overrides]` — Hydra entry point.

Bad input ends with one line on stderr naming the problem and the fix, and exit status 2.
"""
from __future__ import annotations

import logging
import sys

GROUPS = ("model", "dataset", "drafter", "verifier", "experiment", "logger")


def fail(message: str) -> None:
    print(f"quasar_bench: error: {message}", file=sys.stderr)
    sys.exit(2)


def check_group_choices(argv: list[str]) -> None:
    """Hydra reports an unknown config name as a multi-line traceback; catch it first."""
    from .config import choices
    from .errors import unknown

    for arg in argv:
        if "=" not in arg or arg.startswith(("hydra", "+hydra", "--")):
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key not in GROUPS:
            continue
        names = choices(key)
        for v in value.split(","):
            if v and v != "null" and v not in names:
                fail(str(unknown(key, v, names)))


def main() -> None:
    import hydra

    from .config import CONF_DIR
    from omegaconf import DictConfig
    from omegaconf.errors import OmegaConfBaseException

    from .errors import QuasarError

    check_group_choices(sys.argv[1:])
    from .cli_checks import precheck  # unknown keys, conflicting overrides, out_dir, hub reachability

    try:
        precheck(sys.argv[1:], CONF_DIR)
    except QuasarError as e:
        fail(str(e))

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def app(cfg: DictConfig) -> None:
        from .run import Experiment

        logging.getLogger("transformers").setLevel(logging.ERROR)
        try:
            Experiment(cfg).run()
        except QuasarError as e:
            fail(str(e))
        except OmegaConfBaseException as e:
            fail(f"bad configuration: {str(e).splitlines()[0]}")

    app()


if __name__ == "__main__":
    main()
