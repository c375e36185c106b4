"""The rules that turn a request (HTTP or SMTP) into records: one send path, track, contacts."""
