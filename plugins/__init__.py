"""modelpress's built-in compression methods, registered as ordinary plugins through the
``modelpress`` entry-point group (see ``pyproject.toml``)."""
