"""lorasweep: train Stable Diffusion LoRAs and sweep their hyperparameters."""

__version__ = "0.1.0"
