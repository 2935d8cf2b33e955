"""kvmpod's version (pyproject.toml's; tests/unit/test_structure.py checks they agree), in a module of its own so
that modules inside the package need not import the package root, whose lazy API facade would tie them to it."""

__version__ = "0.1.0"
