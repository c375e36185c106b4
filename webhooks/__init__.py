"""Outbound webhooks: the one HTTP client that POSTs them (endpoint deliveries and workflow webhook steps) and
the sender that claims, signs and posts endpoint deliveries."""
