"""CLI sub-commands: each public module defines ``register(app)`` and is picked up by ``polytask.cli``;
``_common`` holds what they share."""
