"""Built-in ``hydra.sweeper.custom_search_space`` functions: the parts of a search space that Hydra's sweep
grammar cannot write, because a knob is either off (``null``) or only meaningful with another choice.

Optuna samples them define-by-run (TPE handles the conditional parameters), and every combination they return
passes the config's checks: no noise offset together with pyramid noise, no input dropout, DoRA or LoRA+ on
LoHa/LoKr, no rank dropout with DoRA, Huber's threshold only with a Huber loss.

    hydra.sweeper.custom_search_space=lorasweep.sweeping.knobs.modern_knobs
"""

from __future__ import annotations

from typing import Any

from lorasweep.config.training import HUBER_LOSSES


def modern_knobs(cfg: Any, trial: Any) -> dict[str, Any]:
    """The loss, noise, network-variant and EMA knobs of issue-8 vintage trainers (kohya sd-scripts, LyCORIS,
    OneTrainer): a value for each key, consistent with the others."""
    out: dict[str, Any] = {}
    algo = trial.suggest_categorical("network.algo", ["lora", "loha", "lokr"])
    out["network.algo"] = algo
    out["network.conv_dim"] = trial.suggest_categorical("network.conv_dim", [None, 4, 8])
    out["network.module_dropout"] = trial.suggest_float("network.module_dropout", 0.0, 0.2)
    if algo == "lora":
        out["network.dropout"] = trial.suggest_float("network.dropout", 0.0, 0.3)
        out["network.dora"] = trial.suggest_categorical("network.dora", [False, True])
        out["network.loraplus_lr_ratio"] = trial.suggest_categorical("network.loraplus_lr_ratio", [None, 4.0, 16.0])
    if not out.get("network.dora"):
        out["network.rank_dropout"] = trial.suggest_float("network.rank_dropout", 0.0, 0.3)

    noise = trial.suggest_categorical("noise", ["plain", "offset", "pyramid"])
    if noise == "offset":
        out["training.noise_offset"] = trial.suggest_float("training.noise_offset", 0.01, 0.1)
    elif noise == "pyramid":
        out["training.multires_noise_iterations"] = trial.suggest_int("training.multires_noise_iterations", 4, 8)
        out["training.multires_noise_discount"] = trial.suggest_float("training.multires_noise_discount", 0.1, 0.5)
    out["training.ip_noise_gamma"] = trial.suggest_float("training.ip_noise_gamma", 0.0, 0.1)
    out["training.min_snr_gamma"] = trial.suggest_categorical("training.min_snr_gamma", [None, 1.0, 5.0])
    loss = trial.suggest_categorical("training.loss_type", ["l2", "l1", "huber", "smooth_l1"])
    out["training.loss_type"] = loss
    if loss in HUBER_LOSSES:
        out["training.huber_c"] = trial.suggest_float("training.huber_c", 0.01, 0.5, log=True)
    out["training.ema.enabled"] = trial.suggest_categorical("training.ema.enabled", [False, True])
    if out["training.ema.enabled"]:
        out["training.ema.decay"] = trial.suggest_categorical("training.ema.decay", [0.9, 0.99, 0.995])
    return out
