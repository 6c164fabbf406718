"""Attacks: one fine-tuning recipe module each. Importing this package registers them."""

from attacks import full_ft, lora  # noqa: F401
