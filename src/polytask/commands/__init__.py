"""CLI sub-commands: each module defines ``register(app)`` and is picked up by ``polytask.cli``."""
