"""Click command groups kept outside ``cli.py`` (which registers each with one ``add_command`` line).

Modules here import nothing heavy at import time: ``mneme --help`` stays fast.
"""
