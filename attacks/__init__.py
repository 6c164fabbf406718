"""Attacks: one recipe module each. Importing this package imports every module in it, which
registers them: a new attack is one new file here."""

from harness.api import import_package_modules

import_package_modules(__name__, __path__)
