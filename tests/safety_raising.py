"""An --arch module whose import fails with something other than ImportError (tests/test_safety_cli.py)."""

raise RuntimeError("needs a GPU")
