"""The `wsss` command line: option parsing, wsss.toml, rich output and one-line errors."""
