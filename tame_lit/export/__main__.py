"""``python -m tame_lit.export CHECKPOINT ...``: the ``tame-export`` command (``tame_lit.cli.export``)."""

from tame_lit.cli.export import main

main()
