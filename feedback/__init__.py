"""Background work on what happens after an event: outbound webhooks (`webhooks`)."""
