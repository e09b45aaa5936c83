"""One module per CLI command: turn parsed arguments into layer calls and rendered output."""
