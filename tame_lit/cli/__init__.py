"""The command-line programs: ``tame-explain`` (explain.py) and ``tame-export`` (export.py)."""
