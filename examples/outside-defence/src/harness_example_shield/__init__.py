"""An example defence shipped outside the harness repository (see README.md beside pyproject.toml)."""
