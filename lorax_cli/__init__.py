"""The command line (``python -m lorax``, also ``python -m lorax_cli``): the top layer of the pack.

It sits above both ``nodes/`` (whose host-side loaders it borrows, through
:func:`lorax_cli.common.backend`) and the pure library ``lorax/``; neither of those imports it
(``tests/test_layering.py`` checks). Importing this package imports nothing: the host is booted
only when a command needs it.
"""
