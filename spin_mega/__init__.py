"""spin-mega: SPIN (Self-Play Fine-Tuning) on Megatron-core."""

__version__ = "0.1.0"
