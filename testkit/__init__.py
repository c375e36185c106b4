"""Stand-ins shared by tests/ and bench/ for what the machine cannot reach (Amazon SNS) and helpers both use."""
