"""What a run writes (results.json, its typed model and schema) and how it is read and summarised."""
