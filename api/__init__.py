"""The aiohttp application: route table, Plunk envelope, bearer auth, per-project rate limit."""
