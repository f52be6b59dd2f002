"""One module per command: ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> exit code``.

:data:`COMMANDS` is the one place to register a new command.
"""

from . import calibrate, evaluate, export, fit, info, predict, serve, sign, tune

COMMANDS = (fit, tune, predict, evaluate, calibrate, export, info, sign, serve)

EXIT_ERROR = 1
