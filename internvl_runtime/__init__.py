"""internvl-runtime: a native PyTorch runtime for the InternVL2 series (no remote code)."""
