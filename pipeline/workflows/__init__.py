"""Workflows and legacy actions: the step grammar (definitions), the rules of saving and running them
(rules), and the engine that moves runs through their steps (engine)."""
