"""The expert registry: the ``Expert`` spec, the Redis store, the embedded Redis and the CLI."""
