"""Defences: one recipe module each. Importing this package registers them."""

from defences import none  # noqa: F401
from defences import repnoise  # noqa: F401
from defences import safety_sft  # noqa: F401
from defences import gradient_ascent  # noqa: F401
from defences import adversarial_loss  # noqa: F401
from defences import security_vectors  # noqa: F401
from defences import vaccine  # noqa: F401
from defences import random_init  # noqa: F401
