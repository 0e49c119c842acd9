"""logger=wandb: the resolved config, the per-row table and the summary table, as one W&B run.

Offline by default (conf/logger/wandb.yaml: mode from $WANDB_MODE, else offline): the run is
written under <dir>/wandb/offline-run-*/ and uploaded later with `wandb sync`; nothing touches the
network. Besides the W&B records, files/quasar_config.json and files/summary.csv in the run folder
hold the config and the summary as plain files (synced with the run).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from omegaconf import OmegaConf

from .errors import QuasarError
from .summary import save as save_summary


def _cell(value):
    """A value W&B tables accept: lists/arrays/dicts as strings, numpy scalars as Python ones."""
    if isinstance(value, (list, tuple, dict)) or hasattr(value, "tolist") and getattr(value, "ndim", 0) > 0:
        return json.dumps(value.tolist() if hasattr(value, "tolist") else value, default=str)
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def table_data(df) -> tuple[list[str], list[list]]:
    columns = [str(c) for c in df.columns]
    return columns, [[_cell(v) for v in row] for row in df.itertuples(index=False, name=None)]


def log_results(cfg, rows, summary, out_dir: Path) -> str:
    """Log one run; returns its local directory. Raises QuasarError (one line) on failure."""
    try:
        import wandb
    except ImportError:
        raise QuasarError("logger=wandb needs the wandb package: pip install wandb (or use logger=none)") from None
    lcfg = cfg.logger
    mode = str(lcfg.get("mode") or "offline")
    if mode not in ("offline", "online", "disabled"):
        raise QuasarError(f"logger.mode={mode} is not a W&B mode; choose offline, online or disabled")
    root = Path(os.path.expanduser(str(lcfg.get("dir") or os.environ.get("WANDB_DIR") or out_dir)))
    root.mkdir(parents=True, exist_ok=True)
    config = OmegaConf.to_container(cfg, resolve=True)
    settings = wandb.Settings(mode=mode, silent=True, console="off", save_code=False,
                              x_disable_stats=True, init_timeout=30)
    try:
        run = wandb.init(project=lcfg.get("project"), entity=lcfg.get("entity"), group=lcfg.get("group"),
                         tags=list(lcfg.get("tags") or []), name=f"{cfg.experiment_name}", job_type="benchmark",
                         config=config, dir=str(root), settings=settings, reinit="create_new")
        run_dir = Path(run.dir).parent
        with open(Path(run.dir) / "quasar_config.json", "w") as f:
            json.dump(config, f, indent=2, sort_keys=True, default=str)
        save_summary(summary, Path(run.dir) / "summary.csv")  # the same file as the run's own summary.csv
        run.save(str(Path(run.dir) / "quasar_config.json"), base_path=run.dir, policy="now")
        run.save(str(Path(run.dir) / "summary.csv"), base_path=run.dir, policy="now")
        cols, data = table_data(rows)
        scols, sdata = table_data(summary)
        run.log({"rows": wandb.Table(columns=cols, data=data),
                 "summary": wandb.Table(columns=scols, data=sdata)})
        run.summary["n_rows"] = len(rows)
        run.summary["out_dir"] = str(Path(out_dir).resolve())
        run.finish()
    except QuasarError:
        raise
    except Exception as e:  # noqa: BLE001 (W&B raises many kinds; the rows are already saved)
        raise QuasarError(f"W&B logging failed ({type(e).__name__}: {str(e).splitlines()[0][:160]}); the results "
                          f"are saved in {out_dir}; use logger.mode=offline or logger=none") from None
    if mode == "offline":
        print(f"wandb: offline run in {run_dir}; upload it with: wandb sync {run_dir}")
    return str(run_dir)
