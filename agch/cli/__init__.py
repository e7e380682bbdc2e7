"""The commands, one module each (agch-train, agch-data, agch-search, agch-ablate, agch-audit, agch-table): argument
parsing, console output and exit codes only; `common` holds the options every command shares and their layering onto
a Config. What a command does lives in agch.experiments, agch.runs and agch.method."""
