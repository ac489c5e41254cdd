"""Command-line entry points (``python tools/NAME.py``): argument parsing and printing over the package.

A package only so that tests can call a tool's ``main(argv)`` in-process (``from tools import cls_eval``);
pytest puts the repository root on ``sys.path`` (``pythonpath`` in pytest.ini).
"""
