"""Everything that touches the database: models, engine, queries, the outbox, migrations."""
