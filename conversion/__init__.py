"""Hugging Face <-> Megatron-core checkpoint conversion (imported as `spin_mega.conversion`).

    hf_to_mcore(hf_dir, out_dir, tp=1, pp=1, dtype=None)   HF safetensors -> spin-mega Megatron checkpoint
    mcore_to_hf(mcore_dir, out_dir)                        spin-mega Megatron checkpoint -> HF directory

The per-architecture parameter mappings are declared in `spin_mega.conversion.mappings`.
"""

from spin_mega.conversion.converters import hf_to_mcore, mcore_to_hf

__all__ = ["hf_to_mcore", "mcore_to_hf"]
