"""Placeholder: the commands of this module are being written."""


def register(sub) -> None:
    pass
