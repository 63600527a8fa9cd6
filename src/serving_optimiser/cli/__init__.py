"""Command-line tools installed with the package (see ``[project.scripts]`` in pyproject.toml)."""
