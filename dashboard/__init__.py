"""The web dashboard: server-rendered pages for people, a face beside `api/` over the same `pipeline/`."""
