"""Gateway plugins. One package per plugin (`<name>/schema.py`, `<name>/handler.py`)."""
