"""Defences: one recipe module each. Importing this package registers them."""

from defences import none  # noqa: F401
from defences import repnoise  # noqa: F401
