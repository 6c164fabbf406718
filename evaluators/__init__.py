"""Evaluators and judges. Importing this package imports every module in it (``judges`` included),
which registers them: a new evaluator is one new file here."""

from harness.api import import_package_modules

import_package_modules(__name__, __path__)
