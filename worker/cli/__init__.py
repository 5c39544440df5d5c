"""The one ``semlabel`` command (:func:`main`); one module per area of commands."""

from .main import main

__all__ = ["main"]
