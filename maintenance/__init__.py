"""Background upkeep of the database: retention (`pruner`)."""
