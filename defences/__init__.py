"""Defences: one recipe module each. Importing this package registers them."""

from defences import (
    adversarial_loss,  # noqa: F401
    gradient_ascent,  # noqa: F401
    none,  # noqa: F401
    random_init,  # noqa: F401
    repnoise,  # noqa: F401
    safety_sft,  # noqa: F401
    security_vectors,  # noqa: F401
    vaccine,  # noqa: F401
)
