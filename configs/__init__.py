"""Shipped run configurations (importable as spin_mega.configs so that wheels carry them)."""
