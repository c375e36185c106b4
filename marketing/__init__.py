"""Background work for campaigns: the fan-out of due campaigns into the outbox."""
