"""The periodic re-check of sending domains' DNS records (`domaincheck.rechecker`)."""
