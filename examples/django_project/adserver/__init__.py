"""The example Django ad server (see ``examples/django_project/README.md``)."""
