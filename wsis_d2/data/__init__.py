from . import datasets  # noqa: F401  (registers builtin datasets)
