"""LMDeploy's ``lmdeploy.vl.constants``."""

IMAGE_TOKEN = "<IMAGE_TOKEN>"
"""Where a prompt's images go in its text (one per image, in order); without it they come before the text."""
