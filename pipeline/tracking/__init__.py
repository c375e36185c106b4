"""Open and click tracking: the signed links and per-project choice (links), and the rewriting of a
message's HTML parts (mime, html)."""
