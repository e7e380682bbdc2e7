"""What a user runs: searches (search_space files, the search driver, its state and plots),
ablations (ablation_spec files, ablation_plan, the ablation driver, ablation_report, statistics), the
cells x seeds runner ablations and the paper's table (paper_table) share (grid), console and markdown
tables (formatting), audits, reading results back (results), and the schema of the files (file_schema). Settings
are layered by agch.config.layered, the one function every command uses."""
