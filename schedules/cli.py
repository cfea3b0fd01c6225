"""Subcommands for traces, simulation and planning (registered into the `jaxmoe` command)."""

from __future__ import annotations


def register(sub) -> None:
    """Add this package's subcommands to the `jaxmoe` argument parser's subparsers."""
