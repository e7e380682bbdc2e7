"""What a user runs: searches (search_space files, the search driver, its state and plots),
ablations (ablation_spec files, ablation_plan, the ablation driver, grid, ablation_report,
statistics), the paper's table (paper_table), audits, and reading results back (results); the
one layering of settings every command uses (settings) and the schema of the files (file_schema)."""
