"""Pretrain a ViT with registers using the DINOv2 recipe.

python train/pretrain.py experiment=demo                 # the CPU demo (synthetic data)
python train/pretrain.py model=vitl registers=4          # DINOv2 defaults, ViT-L/14, 4 registers
python train/pretrain.py experiment=dinov2_vitl14_reg4   # DINOv2's ViT-L/14 recipe + 4 registers
python train/pretrain.py model=vitl registers=4 --cfg job   # print the resolved config
python train/pretrain.py -m registers=0,1,2,4,8,16       # a local sweep (SLURM arrays: slurm/)
python train/pretrain.py -m registers=0,1,2,4,8,16 hydra/launcher=submitit_slurm   # the sweep as SLURM jobs
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vitreg.config import ConfigError, register_configs
from vitreg.data.webdataset import UnusableDataError
from vitreg.lit.pretrain import is_global_zero_process, pretrain
from vitreg.lit.resume_check import ResumeConfigError
from vitreg.runtime.run_dir import register_resolvers

# conf/hydra/launcher/submitit_slurm.yaml takes the plugin's name on purpose: its schema then checks our keys
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/submitit_slurm' is validated against ConfigStore schema")
register_configs()
register_resolvers()  # vitreg.run_dir & co. in conf/hydra/default.yaml: deterministic run dirs, same on every rank


@hydra.main(version_base="1.3", config_path="../conf", config_name="pretrain")
def main(cfg: DictConfig) -> None:
    with open_dict(cfg):
        cfg.paths.run_dir = HydraConfig.get().runtime.output_dir  # differs per job in a multirun
    try:
        summary = pretrain(cfg)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    except UnusableDataError as err:  # a stream that can never fill a batch (every sample unusable)
        sys.exit(f"data error: {err.reason()}")
    except ResumeConfigError as err:
        sys.exit(f"resume refused: {err}")
    if (
        summary.get("preempted")
        and os.environ.get("SUBMITIT_EXECUTOR")
        and (summary.get("requeued") or not is_global_zero_process())
    ):
        # hydra/launcher=submitit_slurm: PreemptionHandler requeued this task. Returning would give submitit a
        # result, and the sweep would count the run as done; end without one, as submitit's own requeue does.
        sys.exit(f"preempted at step {summary['steps']}: requeued; the requeued task continues the run")
    if not is_global_zero_process():
        return  # one summary per run, not one per rank
    if summary.get("already_finished"):
        print(summary["already_finished"])
        return
    print(f"\nrun directory: {summary['run_dir']}")
    print(f"config:        {summary['config']}")
    print(f"checkpoint:    {summary['checkpoint']}")
    print(f"logs:          {summary['logs']}")
    if "telemetry" in summary:
        print(f"telemetry:     {summary['telemetry']} (python scripts/plot_sweep.py {summary['run_dir']})")
    print(f"steps:         {summary['steps']} (skipped: {summary['skipped_steps']})")
    if "knn" in summary:  # the online kNN (callbacks.online_knn): percent per k, before (step 0) and after
        before, after = summary["knn"].get("before"), summary["knn"].get("after")
        if before and after:
            key = "top1_k20" if "top1_k20" in after else list(after)[-1]
            k = key.removeprefix("top1_k")
            print(f"kNN top-1 (k={k}) of the teacher: before {before[key]:.1f}% -> after {after[key]:.1f}%")
    if summary.get("linear", {}).get("after") is not None:
        print(f"linear probe top-1 of the teacher: {summary['linear']['after']:.1f}%")


if __name__ == "__main__":
    main()
