"""Folder the launcher puts on the shards' `PYTHONPATH`: it holds the `sitecustomize` that activates the patch."""
