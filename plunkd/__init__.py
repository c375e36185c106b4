"""plunkd: configuration, the CLI, and the module that wires the server together."""
