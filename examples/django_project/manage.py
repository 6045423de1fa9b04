#!/usr/bin/env python
"""The example Django ad server: ``python examples/django_project/manage.py runserver``."""

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "adserver.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
