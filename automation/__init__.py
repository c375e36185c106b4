"""Background work for workflows: the scheduler that runs due steps."""
